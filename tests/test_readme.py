"""README's test command is the one CI runs."""
from __future__ import annotations

import re

from conftest import REPO


def readme_test_command() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text.split("Run the tests", 1)
    assert len(after) == 2, "README has no 'Run the tests' section"
    block = re.search(r"```[^\n]*\n(.*?)```", after[1], re.DOTALL)
    assert block, "no fenced command after 'Run the tests'"
    lines = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def ci_commands() -> list[str]:
    script = REPO / ".ci" / "run"
    lines = [line.strip() for line in script.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    command = readme_test_command()
    assert command.startswith("python -m pytest")
    commands = ci_commands()
    # The last thing CI does is run exactly README's command (its exit status is CI's).
    assert commands[-1] == command
    assert "set -euo pipefail" in commands
