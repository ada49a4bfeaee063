"""docs/ cannot drift from the code: generated parts are current, the example pass runs as
written, every command shown parses, every link resolves, and the list of target entries
the simulator ignores is true."""
from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import sys
import textwrap
import tomllib
import types

import numpy as np
import onnx_ir as ir
import pytest
from conftest import REPO, mlp_feeds, mlp_model, save, save_npz

import sparsecc
from sparsecc import cli, docgen, ops
from sparsecc.errors import PreconditionError, SparseccError

DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [REPO / "DEVELOPERS.md"]


def fenced(text: str, language: str = "") -> list[str]:
    """The fenced code blocks of a markdown text in that language ('' = no language)."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_generated_docs_are_current():
    stale = [str(p.relative_to(REPO)) for p in docgen.stale()]
    assert not stale, f"{', '.join(stale)} out of date: run `{docgen.COMMAND}` and commit the result"
    assert docgen.main(["--check"]) == 0


def test_the_check_sees_drift(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    for path, text in docgen.expected(docs).items():   # current, whatever the working tree holds
        path.write_text(text)
    assert docgen.stale(docs) == []
    cli_md = docs / "cli.md"
    cli_md.write_text(cli_md.read_text().replace("--per-consumer", "--per-site"))
    seneca = docs / "seneca.md"
    seneca.write_text(seneca.read_text().replace("| `energy_pj.add` | 1.4 |", "| `energy_pj.add` | 1.3 |"))
    assert docgen.stale(docs) == [cli_md, seneca]
    # the hand-written text around a generated section is kept when it is regenerated
    assert "## Energy model" in docgen.expected(docs)[seneca]


def test_cli_reference_covers_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, sub in commands.items():
        section = text.split(f"\n## sparsecc {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if action.dest not in ("help", "verbose", "quiet", "json"):
                    assert f"`{flag}" in section or f", {flag}" in section, f"{name} {flag}"
    for name in [*sparsecc.passes.BUILTIN, "partition"]:   # partition: the seneca backend's
        assert f"\n### {name}\n" in text


def example_pass(name: str = "doc_round_thresholds") -> types.ModuleType:
    """The example pass of writing-a-pass.md, executed as a module."""
    text = (DOCS / "writing-a-pass.md").read_text()
    source = fenced(text.split("<!-- example: round-thresholds -->", 1)[1], "python")[0]
    module = types.ModuleType(name)
    sys.modules[name] = module   # dataclass type hints are resolved through the module
    exec(compile(source, f"docs/writing-a-pass.md:{name}", "exec"), module.__dict__)
    return module


@pytest.fixture
def example():
    module = example_pass()
    yield module
    sys.modules.pop(module.__name__, None)


def test_example_pass_rounds_like_float16(example, mlp_path, mlp_npz):
    calib = sparsecc.data_source(str(mlp_npz))
    passes = sparsecc.default_pipeline(sparsity=0.5) + [example.RoundThresholds()]
    result = sparsecc.compile_model(mlp_path, passes, calib)
    report = result.report["passes"][-1]
    assert report["pass"] == "round-thresholds" and report["config"] == {"bits": 10, "direction": "nearest"}
    rows = report["details"]["thresholds"]
    assert len(rows) == 3 and report["changed"]
    for row in rows:   # 10 mantissa bits: what numpy's own float16 conversion keeps
        assert row["after"] == float(np.float16(row["before"])) and row["before"] > 0
    levels = {n.name: ops.threshold_level(n) for n in result.model.graph if ops.is_threshold(n)}
    assert levels == {r["threshold"]: r["after"] for r in rows}


def test_example_pass_rounds_up_and_checks(example, mlp_path, mlp_npz):
    calib = sparsecc.data_source(str(mlp_npz))
    passes = sparsecc.default_pipeline(sparsity=0.5) + [example.RoundThresholds(bits=3, direction="up")]
    rows = sparsecc.compile_model(mlp_path, passes, calib).report["passes"][-1]["details"]["thresholds"]
    for row in rows:
        mantissa, _ = np.frexp(row["after"])
        assert row["after"] >= row["before"] and (mantissa * 16) % 1 == 0   # 1 + 3 significant bits
    assert any(row["after"] > row["before"] for row in rows)
    with pytest.raises(SparseccError, match=r"bits must be in \[1, 23\] \(got 0\)"):
        example.RoundThresholds(bits=0)
    with pytest.raises(SparseccError, match="direction must be one of nearest, up"):
        example.RoundThresholds(direction="down")
    with pytest.raises(PreconditionError, match="pipeline order: round-thresholds needs Threshold ops, which no pass "
                                                "before it provides; put insert-thresholds before it"):
        sparsecc.compile_model(mlp_path, [example.RoundThresholds()])


def test_example_pass_as_a_plugin_in_a_pipeline_file(tmp_path, monkeypatch, capsys):
    """The page's entry-point and pipeline snippets, as written, with the page's pass installed
    the way a package installs it (a module plus a .dist-info with the entry point)."""
    text = (DOCS / "writing-a-pass.md").read_text()
    entry = tomllib.loads(fenced(text, "toml")[0])["project"]["entry-points"]["sparsecc.passes"]
    (name, target), = entry.items()
    module, _, attr = target.partition(":")
    package = tmp_path / "site" / module.split(".")[0]
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / (module.split(".")[1] + ".py")).write_text(
        fenced(text.split("<!-- example: round-thresholds -->", 1)[1], "python")[0])
    info = tmp_path / "site" / "doc_example-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: doc-example\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[sparsecc.passes]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    try:
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(fenced(text, "yaml")[0])
        model = save(mlp_model(), tmp_path / "model.onnx")
        calib = save_npz(mlp_feeds(8, rows=32), tmp_path / "calib.npz")
        assert cli.main(["list", "passes", "-v"]) == 0
        assert "round-thresholds" in capsys.readouterr().out
        out = tmp_path / "out"
        assert cli.main(["compile", str(model), "--pipeline", str(pipeline), "--calib", str(calib), "-o", str(out),
                         "--no-cache", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        last = report["passes"][-1]
        assert last["pass"] == "round-thresholds" and last["config"] == {"bits": 7, "direction": "up"}
        assert all(r["after"] >= r["before"] for r in last["details"]["thresholds"])
        # the page's by-hand Python block, in a folder holding model.onnx and calib.npz
        monkeypatch.chdir(tmp_path)
        by_hand = [b for b in fenced(text, "python") if "compile_model" in b][0]
        namespace = {"RoundThresholds": getattr(importlib.import_module(module), attr)}
        exec(by_hand, namespace)
        written = ir.load(tmp_path / "out" / "model.onnx")
        levels = [ops.threshold_level(n) for n in written.graph if ops.is_threshold(n)]
        assert levels and all((np.frexp(t)[0] * 256) % 1 == 0 for t in levels)   # bits=7
    finally:
        for loaded in [m for m in sys.modules if m == module.split(".")[0] or m.startswith(module.split(".")[0] + ".")]:
            sys.modules.pop(loaded)


def shown_commands() -> list[tuple[str, str]]:
    """Every `sparsecc ...` command line in a plain code block of the docs (page, line); cli.md's
    blocks are synopses generated from the parser itself."""
    found = []
    for page in [p for p in PAGES if p.name != "cli.md"] + [REPO / "samples" / "plugin_backend" / "README.md"]:
        for block in fenced(page.read_text()):
            for line in block.splitlines():
                line = line.split(" | ", 1)[0].split("#", 1)[0].strip()
                if line.startswith("sparsecc "):
                    found.append((page.name, line))
    return found


def test_every_command_shown_parses():
    commands = shown_commands()
    assert len(commands) >= 10 and {"compile", "eval", "inspect", "simulate"} <= {c.split()[1] for _, c in commands}
    for page, line in commands:
        try:
            cli.build_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"{page}: `{line}` does not parse with this CLI")


def test_links_resolve():
    for page in PAGES + [REPO / "samples" / "plugin_backend" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_unread_target_entries_are_listed_exactly():
    """seneca.md's list of target entries no code reads is the list the code gives."""
    from sparsecc.backends.seneca import cost
    from sparsecc.backends.seneca.target import ENTRIES

    text = (DOCS / "seneca.md").read_text()
    section = text.split("### Entries the simulator does not read", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(\w+\.\w+)`", section))
    code = "\n".join(p.read_text() for folder in ("sparsecc", "backends", "passes")
                     for p in sorted((REPO / folder).rglob("*.py")) if p.name not in ("target.py", "docgen.py"))
    by_table = {key for keys in cost._NPE.values() for key in keys}   # energies read through the instruction table
    unread = {f"{section}.{key}" for section, keys in ENTRIES.items() for key in keys
              if not re.search(rf"\[[\"']{key}[\"']\]", code) and not (section == "energy_pj" and key in by_table)}
    assert listed - {"core.npes"} == unread, textwrap.shorten(f"doc {sorted(listed)} vs code {sorted(unread)}", 400)
