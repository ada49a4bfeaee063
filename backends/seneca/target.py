"""Target descriptions: every number of a hardware target in one editable TOML file.

Each entry is `{ value = ..., source = "published" | "assumed", note = "..." }`, so a report
can always say which of its inputs come from the literature and which are sparsecc's
assumptions. Built-in targets live in `backends/seneca/targets/`; any other file can be given by
path. Loading checks that every entry the simulator needs is present, of the right kind and
in range, and names the first one that is not.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from sparsecc.errors import SparseccError, excerpt

SCHEMA = "sparsecc.target/1"
BUILTIN_DIR = Path(__file__).parent / "targets"

# section -> entry -> kind: "count" (integer >= 1), "number" (>= 0), or a set of allowed strings
ENTRIES: dict[str, dict[str, Any]] = {
    "mesh": {"rows": "count", "cols": "count"},
    "core": {"npes": "count", "register_words": "count", "word_bits": "count", "data_memory_bytes": "count",
             "instruction_memory_bytes": "count", "event_queue_depth": "count", "lanes_fp16": "count",
             "lanes_int8": "count", "area_mm2": "number", "vector_energy": {"per-npe", "per-instruction"}},
    "clock": {"frequency_hz": "number", "cycles_per_npe_instruction": "number",
              "cycles_per_riscv_instruction": "number", "controller_ops_per_event": "number"},
    "energy_pj": {k: "number" for k in ("add", "sub", "mul", "int8x2", "compare", "eql_abs", "logic", "shift", "i2f",
                                        "rnd", "mld", "mld_memory", "mst", "mst_memory", "evc", "evc_per_event", "riscv", "riscv_memory_extra",
                                        "noc_transfer")},
    "noc": {"energy_per": {"hop", "transfer"}, "cycles_per_hop": "number", "flit_bits": "count"},
    "memory_fj_per_bit": {k: "number" for k in ("register", "sram_read", "sram_write", "stt_mram", "hbm")},
    "numerics": {"value_format": {"float16", "float32"}, "register_format": {"float32"}},
}
SOURCES = ("published", "assumed")


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    path: Path
    values: dict[str, dict[str, Any]]     # section -> entry -> value
    sources: dict[str, dict[str, str]]    # section -> entry -> "published" | "assumed"

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    @property
    def cores(self) -> int:
        return self["mesh"]["rows"] * self["mesh"]["cols"]

    def assumptions(self) -> list[str]:
        return [f"{s}.{k}" for s, entries in self.sources.items() for k, src in entries.items() if src == "assumed"]


def builtin() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}


MAX_TARGET_BYTES = 1 << 20   # the built-in ones are a few KiB


def load_target(name_or_path: str | os.PathLike) -> Target:
    """A built-in target by name, or a target file by path."""
    path = builtin().get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        raise SparseccError(f"unknown target {str(name_or_path)!r}: not a built-in ({', '.join(builtin())}) "
                            "nor a TOML file; see `sparsecc list targets`")
    if path.stat().st_size > MAX_TARGET_BYTES:
        raise SparseccError(f"target file {path} is {path.stat().st_size} bytes, more than a target file can be "
                            f"({MAX_TARGET_BYTES}); check the path")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SparseccError(f"target file {path} is not valid TOML ({str(exc).splitlines()[0]}); fix the file") from None
    except RecursionError:
        raise SparseccError(f"target file {path} is nested too deeply to read; fix the file") from None
    where = f"target file {path}"
    if doc.get("schema") != SCHEMA:
        raise SparseccError(f"{where}: schema must be {SCHEMA!r} (got {excerpt(doc.get('schema'))})")
    values: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for section, entries in ENTRIES.items():
        table = doc.get(section)
        if not isinstance(table, dict):
            raise SparseccError(f"{where}: section [{section}] is missing; copy it from {builtin()['seneca']}")
        unknown = sorted(set(table) - set(entries))
        if unknown:
            raise SparseccError(f"{where}: unknown entry {section}.{unknown[0]}; valid: {', '.join(entries)}")
        values[section], sources[section] = {}, {}
        for key, kind in entries.items():
            values[section][key], sources[section][key] = _entry(table.get(key), kind, f"{where}: {section}.{key}")
    return Target(str(doc.get("name", path.stem)), str(doc.get("description", "")), path, values, sources)


def _entry(raw: Any, kind: Any, where: str) -> tuple[Any, str]:
    if raw is None:
        raise SparseccError(f"{where} is missing; add `{{ value = ..., source = \"assumed\" }}`")
    if not isinstance(raw, dict) or "value" not in raw:
        raise SparseccError(f"{where} must be a table {{ value = ..., source = \"published\" | \"assumed\" }}")
    value, source = raw["value"], raw.get("source")
    if source not in SOURCES:
        raise SparseccError(f"{where}: source must be \"published\" or \"assumed\" (got {source!r})")
    if isinstance(kind, set):
        if value not in kind:
            raise SparseccError(f"{where} must be one of {', '.join(sorted(kind))} (got {value!r})")
        return value, source
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SparseccError(f"{where} must be a number (got {value!r})")
    if kind == "count" and (value < 1 or value != int(value)):
        raise SparseccError(f"{where} must be a whole number of at least 1 (got {value!r})")
    if value < 0:
        raise SparseccError(f"{where} must not be negative (got {value!r})")
    return (int(value) if kind == "count" else value), source
