"""The backend interface that built-in and third-party backends implement.

A backend is a class registered under the `sparsecc.backends` entry-point group:

    [project.entry-points."sparsecc.backends"]
    mychip = "mychip_sparsecc:MyChipBackend"

It answers, per node, whether it can run it (`declines`: node -> reason, never a crash),
`lower` turns a compiled model into its own artifacts inside the output folder, and
`requires` names passes it needs (e.g. `partition`), which compile appends when missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import onnx_ir as ir


class Backend:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()   # passes compile appends (with defaults) when the pipeline lacks them

    def declines(self, model: ir.Model) -> dict[str, str]:
        """Nodes this backend cannot run, with the reason for each (empty: runs everything)."""
        return {}

    def lower(self, model: ir.Model, out_dir: Path) -> dict:
        """Write backend artifacts for `model` into `out_dir`; return a report (plain JSON values)."""
        return {}
