"""The backend interface that built-in and third-party backends implement.

A backend is a class registered under the `sparsecc.backends` entry-point group:

    [project.entry-points."sparsecc.backends"]
    mychip = "mychip_sparsecc:MyChipBackend"

It answers, per node, whether it can run it (`declines`: node -> reason, never a crash),
`lower` turns a compiled model into its own artifacts inside the output folder, `passes`
are passes it contributes to the registry (seneca's `partition`), and `requires` names passes
it needs, which compile appends when missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import onnx_ir as ir


class Backend:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()   # passes compile appends (with defaults) when the pipeline lacks them
    passes: ClassVar[tuple[type, ...]] = ()    # Pass classes this backend contributes (under their names)

    def declines(self, model: ir.Model) -> dict[str, str]:
        """Nodes this backend cannot run, with the reason for each (empty: runs everything)."""
        return {}

    @classmethod
    def report_section(cls):
        """The module that presents this backend's run reports, or None: `SCHEMA` (the prefix of
        their schema) and `KIND`, `summary(report, speed)` (terminal), `markdown(report)`
        (report.md), `title(report)`, `facts(report)` ([(name, text)]) and `figures(report)`
        ([sparsecc.report_page.Figure]) for report.html."""
        return None

    @classmethod
    def doc_sections(cls) -> dict[str, Callable[[], str]]:
        """Generated sections of docs/ (`<!-- generated: NAME -->`) this backend writes: name -> text."""
        return {}

    def lower(self, model: ir.Model, out_dir: Path) -> dict:
        """Write backend artifacts for `model` into `out_dir`; return a report (plain JSON values)."""
        return {}
