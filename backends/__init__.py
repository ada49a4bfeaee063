"""Backends: what runs a compiled model. Built-in and third-party backends alike are found
through the `sparsecc.backends` entry-point group; the entry-point name is the stable id."""
from __future__ import annotations

from importlib.metadata import entry_points

from sparsecc.backends.base import Backend
from sparsecc.errors import SparseccError

GROUP = "sparsecc.backends"


def registry() -> dict[str, type[Backend]]:
    return {ep.name: ep.load() for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name)}


def report_section(report: dict):
    """The report section (`Backend.report_section`) of the backend whose run reports have this
    report's schema, else None."""
    schema = report.get("schema", "")
    for cls in registry().values():
        section = cls.report_section()
        if section is not None and schema.startswith(section.SCHEMA):
            return section
    return None


def get(name: str) -> Backend:
    found = registry()
    if name not in found:
        raise SparseccError(f"unknown backend {name!r}; installed backends: {', '.join(found) or 'none'} "
                            "(is sparsecc installed with pip install -e .?)")
    return found[name]()
