"""Typed, self-describing configurations.

A pass's config is a dataclass; each field carries its documentation in
`field(metadata={"doc": ...})` and, for a closed set of values, a `Literal` type. The CLI
help, `sparsecc list passes -v` and the pipeline-file schema are all read from these.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from sparsecc.errors import SparseccError, excerpt


def option(default: Any, doc: str) -> Any:
    """A documented config field."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: Any
    default: Any
    doc: str

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else None

    def type_name(self) -> str:
        if self.choices:
            return "|".join(map(str, self.choices))
        return getattr(self.type, "__name__", str(self.type)).replace("NoneType", "none")


def fields(cls: type) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    return [FieldInfo(f.name, hints[f.name], f.default, f.metadata.get("doc", ""))
            for f in dataclasses.fields(cls)]


def _coerce(info: FieldInfo, value: Any, where: str) -> Any:
    kind = info.type
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else (kind,)
    if value is None and type(None) in allowed:
        return None
    if info.choices:
        if value not in info.choices:
            raise SparseccError(f"{where}: {info.name} must be one of {', '.join(map(str, info.choices))} (got {excerpt(value)})")
        return value
    for target in allowed:
        if target is bool and isinstance(value, bool):
            return value
        if target is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if target is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if target in (int, float) and isinstance(value, str):
            try:
                return target(value)
            except ValueError:
                continue
        if target is str and isinstance(value, str):
            return value
    raise SparseccError(f"{where}: {info.name} must be {info.type_name()} (got {excerpt(value)})")


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Make a config of type `cls` from plain values (YAML, CLI), with clear errors."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SparseccError(f"{where}: unknown option {excerpt(unknown[0])}; valid options: {', '.join(known) or 'none'}")
    values = {k: _coerce(known[k], v, where) for k, v in values.items()}
    try:
        return cls(**values)
    except SparseccError as exc:   # a value the config itself refuses: say where it came from too
        raise SparseccError(f"{where}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def schema(cls: type) -> dict:
    """JSON Schema of a config class."""
    props = {}
    for f in fields(cls):
        entry: dict[str, Any] = {"description": f.doc, "default": f.default}
        if f.choices:
            entry["enum"] = list(f.choices)
        else:
            entry["type"] = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(f.type, "string")
        props[f.name] = entry
    return {"type": "object", "properties": props, "additionalProperties": False}
