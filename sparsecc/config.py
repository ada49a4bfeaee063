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


def option(default: Any, doc: str, within: str | None = None) -> Any:
    """A documented config field; `within` is the interval its value must lie in, written as
    in mathematics ("[0, 1)", "[1, inf)"), checked wherever a config is made and shown in the docs."""
    metadata = {"doc": doc} | ({"within": Interval.parse(within)} if within is not None else {})
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Interval":
        low, high = (part.strip() for part in text.strip()[1:-1].split(","))
        return cls(float(low), float(high), text.strip()[0] == "[", text.strip()[-1] == "]")

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below   # NaN is in no interval

    def describe(self) -> str:
        """For an error: 'at least 1', 'greater than 0', 'in [0, 1)'."""
        if self.high == float("inf"):
            return f"{'at least' if self.low_closed else 'greater than'} {self.low:g}"
        return f"in {self}"

    def __str__(self) -> str:
        number = lambda x: "inf" if x == float("inf") else f"{x:g}"
        return (f"{'[' if self.low_closed else '('}{number(self.low)}, "
                f"{number(self.high)}{']' if self.high_closed else ')'}")


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: Any
    default: Any
    doc: str
    within: Interval | None = None

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else None

    def type_name(self) -> str:
        if self.choices:
            return "|".join(map(str, self.choices))
        return getattr(self.type, "__name__", str(self.type)).replace("NoneType", "none")

    def kind(self) -> str:
        """The type with its interval, for help and docs: 'float in [0, 1)'."""
        return self.type_name() + (f" in {self.within}" if self.within is not None else "")


def fields(cls: type) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    return [FieldInfo(f.name, hints[f.name], f.default, f.metadata.get("doc", ""), f.metadata.get("within"))
            for f in dataclasses.fields(cls)]


def check_ranges(cls: type, values: dict[str, Any]) -> None:
    """Raise unless every value of a field with a declared interval lies inside it (before the
    config's own cross-field checks, which may assume it)."""
    for f in fields(cls):
        value = values.get(f.name)
        if f.within is not None and value is not None and value not in f.within:
            raise SparseccError(f"{f.name} must be {f.within.describe()} (got {value!r}); e.g. {f.default!r}, the default")


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
        check_ranges(cls, values)
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
        if f.within is not None:
            low, high = ("minimum", "maximum")
            entry[low if f.within.low_closed else "exclusiveMinimum"] = f.within.low
            if f.within.high != float("inf"):
                entry[high if f.within.high_closed else "exclusiveMaximum"] = f.within.high
        if f.choices:
            entry["enum"] = list(f.choices)
        else:
            entry["type"] = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(f.type, "string")
        props[f.name] = entry
    return {"type": "object", "properties": props, "additionalProperties": False}
