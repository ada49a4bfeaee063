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


def test_readme_and_ci_install_with_the_pinned_versions():
    """A fresh machine installs exactly what CI tested: README's set-up command and .ci/run
    both go through scripts/install.sh, which installs with constraints.txt."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup = re.search(r"```[^\n]*\n(.*?)```", readme.split("## Quick start", 1)[1], re.DOTALL).group(1)
    assert setup.strip().startswith("sh scripts/install.sh && ")
    assert "sh scripts/install.sh" in ci_commands()
    script = (REPO / "scripts" / "install.sh").read_text(encoding="utf-8")
    assert '-c constraints.txt -e ".[test]"' in script
    pins = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    # every direct dependency of the package and its test extra is pinned to one version
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower().replace("_", "-")
        assert pins.get(name), f"{name} is not pinned in constraints.txt"
    assert pins["torch"] == "2.13.0"   # the CPU build on disk; a bare torch pulls CUDA
