"""The generated parts of docs/, from the code they describe, so they cannot drift.

    python -m sparsecc.docgen            rewrite them
    python -m sparsecc.docgen --check    exit 1 and name the stale files (tests/test_docs.py runs this)

Generated: docs/cli.md as a whole (from the argument parser, the passes' configs, the
built-in backends and targets), and in docs/seneca.md and docs/writing-a-backend.md the parts
between `<!-- generated: NAME -->` and `<!-- end: NAME -->`: the sections a built-in backend
contributes (`Backend.doc_sections`: seneca's instruction set, instruction table and target
entries, `backends/seneca/docs.py`) and the sample backend package's files (from
samples/plugin_backend).
Everything here is independent of the machine: no terminal widths, no paths from the
environment (the cache folder's default is written as its rule, not its value).
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import distribution
from pathlib import Path

from sparsecc import config as cfg

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
COMMAND = "python -m sparsecc.docgen"
_COMMON = {"verbose", "quiet", "json", "help"}   # -v/-q/--json on every command: documented once


def cli_markdown() -> str:
    from sparsecc import cli

    parser = cli.build_parser()
    lines = ["# Command-line reference", "",
             f"Generated from the code by `{COMMAND}`; do not edit by hand (tests/test_docs.py fails when it is stale).",
             "", parser.description or "", "", "```", _usage("sparsecc", parser) + " COMMAND ...", "```", "",
             "Options every command takes, before or after the command name:", ""]
    lines += _options(a for a in parser._actions if a.dest in _COMMON | {"version"} and a.dest != "help")
    lines += ["", "Results go to stdout (one JSON document with `--json`), progress and logs to stderr. "
              "An error a user can fix prints one line, `sparsecc: error: ...`, and exits 2; `-v` adds the traceback.",
              ""]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in commands._choices_actions}
    lines += ["| command | does |", "|---|---|"]
    lines += [f"| [`{name}`](#sparsecc-{name}) | {_cell(helps[name])} |" for name in commands.choices]
    for name, sub in commands.choices.items():
        lines += ["", f"## sparsecc {name}", "", sub.description or helps[name], "", "```",
                  _usage(f"sparsecc {name}", sub), "```"]
        for group in sub._action_groups:
            actions = [a for a in group._group_actions if a.dest not in _COMMON]
            if not actions:
                continue
            title = {"positional arguments": "Arguments", "options": "Options"}.get(group.title, group.title)
            lines += ["", f"{title[0].upper()}{title[1:]}:", ""]
            lines += _options(actions)
    lines += ["", *_passes(), *_backends(), "", *_targets()]
    return "\n".join(lines).rstrip("\n") + "\n"


def _usage(prog: str, parser: argparse.ArgumentParser) -> str:
    """One usage line, written out here: argparse's own wraps by terminal width and its format
    changes between Python versions."""
    parts = [prog]
    for a in parser._actions:
        if a.dest in _COMMON or a.dest == "version" or isinstance(a, argparse._SubParsersAction):
            continue
        if not a.option_strings:
            parts.append(_metavar(a))
            continue
        flag = next((s for s in a.option_strings if s.startswith("--")), a.option_strings[0])
        text = flag if a.nargs == 0 else f"{flag} {_metavar(a)}"
        parts.append(text if a.required else f"[{text}]")
    return " ".join(parts)


def _metavar(a: argparse.Action) -> str:
    if a.metavar is not None:
        name = a.metavar
    elif a.choices:
        name = "{" + ",".join(map(str, a.choices)) + "}"
    else:
        name = a.dest.upper()
    if a.nargs == "+":
        return f"{name} [{name} ...]"
    return name


def _options(actions) -> list[str]:
    out = []
    for a in actions:
        names = ", ".join(a.option_strings) if a.option_strings else _metavar(a)
        if a.option_strings and a.nargs != 0:
            names += " " + _metavar(a)
        text = a.help or ""
        if a.dest == "version":
            text = "print the version and exit"
        if isinstance(a, argparse._AppendAction) and "repeatable" not in text:
            text += " (repeatable)"
        out.append(f"- `{names}`" + (f": {text}" if text else ""))
    return out


def _passes() -> list[str]:
    from sparsecc.passes import BUILTIN

    passes = BUILTIN | {p.name: p for ep in _own_backends() for p in ep.load().passes}
    lines = ["## Passes", "", "Every built-in pass (and those of the built-in backends) with its options, for pipeline files (`--pipeline`, see "
             "`samples/pipeline.yaml`) and `--search-option`. `sparsecc list passes -v` prints the same, with any "
             "installed third-party passes.", ""]
    for name in sorted(passes):
        cls = passes[name]
        lines += [f"### {name}", "", cls.summary() or "(no summary)", ""]
        fields = cfg.fields(cls.Config)
        if not fields:
            lines += ["No options.", ""]
            continue
        lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{f.name}` | {_cell(f.kind())} | `{f.default}` | {_cell(f.doc)} |" for f in fields]
        lines.append("")
    return lines


def _backends() -> list[str]:
    """The backends sparsecc itself registers (not whatever else is installed here)."""
    lines = ["## Backends (`--target`)", "", "| backend | does | requires |", "|---|---|---|"]
    for ep in _own_backends():
        cls = ep.load()
        lines.append(f"| `{ep.name}` | {_cell(cls.description)} | {', '.join(cls.requires) or '-'} |")
    lines += ["", "Third-party backends join through the same entry-point group: see "
              "[writing-a-backend.md](writing-a-backend.md)."]
    return lines


def _own_backends() -> list:
    """The entry points of the backends sparsecc ships (third-party ones are not documented here)."""
    return sorted((ep for ep in distribution("sparsecc").entry_points if ep.group == "sparsecc.backends"),
                  key=lambda ep: ep.name)


def _targets() -> list[str]:
    from sparsecc.backends.seneca.target import builtin, load_target

    lines = ["## Targets (`partition` pass, `target` option)", "", "| target | cores | description |", "|---|---|---|"]
    for name in builtin():
        t = load_target(name)
        lines.append(f"| `{name}` | {t.cores} ({t['mesh']['rows']} x {t['mesh']['cols']}) | {_cell(t.description)} |")
    lines += ["", "Every number of a target, with its source: [seneca.md](seneca.md#energy-model)."]
    return lines


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---- docs/seneca.md sections -------------------------------------------------------------------

def _sample_file(relative: str, language: str):
    """A file of the sample backend package as a fenced code block."""
    def block() -> str:
        text = (REPO / "samples" / "plugin_backend" / relative).read_text(encoding="utf-8")
        return f"`samples/plugin_backend/{relative}`:\n\n```{language}\n{text.rstrip()}\n```"
    return block


SECTIONS = {"plugin-pyproject": _sample_file("pyproject.toml", "toml"),
            "plugin-source": _sample_file("sparsecc_stats/__init__.py", "python")}
GENERATED_IN = ("seneca.md", "writing-a-backend.md")   # files with generated sections


def sections() -> dict:
    """Every generated section: docgen's own and those the built-in backends contribute."""
    out = dict(SECTIONS)
    for ep in _own_backends():
        out |= ep.load().doc_sections()
    return out


def fill_sections(text: str) -> str:
    """`text` with every generated section replaced by its current content."""
    known = sections()

    def replace(m: re.Match) -> str:
        name = m.group(1)
        if name not in known:
            raise ValueError(f"unknown generated section {name!r}; known: {', '.join(known)}")
        return f"<!-- generated: {name} -->\n{known[name]()}\n<!-- end: {name} -->"

    return re.sub(r"<!-- generated: ([\w-]+) -->\n.*?<!-- end: \1 -->", replace, text, flags=re.DOTALL)


def expected(docs: Path = DOCS) -> dict[Path, str]:
    """Every generated file -> the text it should hold."""
    out = {docs / "cli.md": cli_markdown()}
    for name in GENERATED_IN:
        path = docs / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing: it is written by hand around its generated sections; restore it")
        out[path] = fill_sections(path.read_text(encoding="utf-8"))
    return out


def stale(docs: Path = DOCS) -> list[Path]:
    return [path for path, text in expected(docs).items()
            if not path.is_file() or path.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Regenerate the generated parts of docs/.")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"{path.relative_to(REPO)} is stale: run `{COMMAND}`", file=sys.stderr)
        return 1 if old else 0
    for path, text in expected().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
