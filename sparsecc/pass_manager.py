"""Passes and the pass manager.

A pass is a small class with a stable kebab-case `name`, a typed `Config` (see
sparsecc.config), preconditions in `check`, and `run`, which edits the model in place and
returns a structured report (plain JSON values). The manager runs an explicit, ordered
list of passes, verifies the graph after each, times them, and dumps the IR after the
passes named in `dump_after`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sparsecc import config as cfg
from sparsecc.errors import PreconditionError, SparseccError
from sparsecc.progress import log

if TYPE_CHECKING:   # annotations only: the CLI imports this module to parse its flags
    import onnx_ir as ir


@dataclasses.dataclass
class Context:
    """What passes share besides the model: data and cache. Facts about the model itself live
    in the model (ops, initializers), so every pass re-derives them from the graph it gets."""

    calibration: Any = None            # a sparsecc.data.FeedSource, for passes that calibrate
    cache_dir: Path | None = None      # calibration cache; None disables caching
    device: str = "auto"               # where PyTorch-based passes run (sparsecc.devices)


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    pass


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type] = EmptyConfig

    def __init__(self, config: Any = None, *, id: str | None = None, **options: Any):
        if config is not None and options:
            raise TypeError("give a config object or keyword options, not both")
        self.config = config if config is not None else cfg.build(self.Config, options, self.name)
        self.id = id or self.name

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check(self, model: ir.Model, ctx: Context) -> None:
        """Raise PreconditionError when the pass cannot run on `model`."""

    def run(self, model: ir.Model, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, {self.config})"


@dataclasses.dataclass
class PassReport:
    id: str
    name: str
    config: dict[str, Any]
    changed: bool
    details: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Deterministic part (no timing): for report.json."""
        return {"id": self.id, "pass": self.name, "config": self.config, "changed": self.changed,
                "details": self.details}


class PassManager:
    def __init__(self, passes: list[Pass], *, verify: bool = True, dump_after: tuple[str, ...] = (),
                 dump_dir: Path | None = None):
        ids = [p.id for p in passes]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate:
            raise SparseccError(f"pipeline has two passes with id {duplicate!r}; give each an `id`")
        unknown = [d for d in dump_after if d not in ids and d not in {p.name for p in passes}]
        if unknown:
            raise SparseccError(f"--dump-after {unknown[0]!r} names no pass of the pipeline ({', '.join(ids)})")
        self.passes, self.verify, self.dump_after, self.dump_dir = passes, verify, dump_after, dump_dir

    def run(self, model: ir.Model, ctx: Context) -> list[PassReport]:
        reports = []
        for step, p in enumerate(self.passes, 1):
            log(f"[{step}/{len(self.passes)}] {p.id}")
            p.check(model, ctx)
            start = time.perf_counter()
            details = p.run(model, ctx)
            seconds = time.perf_counter() - start
            changed = bool(details.pop("changed", True))
            if self.verify:
                verify(model, after=p.id)
            if p.id in self.dump_after or p.name in self.dump_after:
                self._dump(model, p.id)
            reports.append(PassReport(p.id, p.name, cfg.to_dict(p.config), changed, details, seconds))
        return reports

    def _dump(self, model: ir.Model, pass_id: str) -> None:
        if self.dump_dir is None:
            raise SparseccError("IR dumps need a dump folder (--dump-dir)")
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"after-{pass_id}.txt"
        path.write_text(str(model), encoding="utf-8")
        log(f"dumped IR after {pass_id} to {path}")


def verify(model: ir.Model, after: str = "") -> None:
    """Cheap structural checks between passes: every input defined before use, unique
    names, every custom domain declared. (The ONNX checker is too slow for large models.)"""
    graph = model.graph
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        for value in node.inputs:
            if value is not None and value.name not in defined and value.const_value is None:
                raise SparseccError(f"invalid graph after {after}: node {node.name!r} reads {value.name!r} "
                                    "before it is defined (a pass broke topological order)")
        for value in node.outputs:
            if value.name in defined:
                raise SparseccError(f"invalid graph after {after}: tensor {value.name!r} is defined twice")
            defined.add(value.name)
        if node.domain not in ("", "ai.onnx") and node.domain not in model.opset_imports:
            raise SparseccError(f"invalid graph after {after}: domain {node.domain!r} of node {node.name!r} is not imported")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise PreconditionError(message)


def require_thresholds(model: ir.Model, pass_name: str) -> None:
    """Fail unless the model has Threshold ops, saying why it has none: no linear sites at
    all, only heads and naturally sparse ones, or no insert-thresholds before `pass_name`."""
    from sparsecc import ops
    from sparsecc.sites import analyze

    if any(ops.is_threshold(n) for n in model.graph):
        return
    sites = analyze(model.graph).sites
    if not sites:
        raise PreconditionError(f"{pass_name} found no Threshold ops: the model has no linear sites (MatMul/Gemm "
                                "with a constant weight); compile it without --calib/--sparsity")
    if all(s.head or s.natural for s in sites):
        heads = sum(s.head for s in sites)
        raise PreconditionError(f"{pass_name} found no Threshold ops: the model's {len(sites)} linear site(s) are "
                                f"{heads} head(s), kept dense, and {len(sites) - heads} naturally sparse; pass "
                                "--include-head to threshold a head, or compile without --calib/--sparsity")
    raise PreconditionError(f"{pass_name} found no Threshold ops: run insert-thresholds before it")


def require_calibration(ctx: Context, pass_name: str) -> None:
    require(ctx.calibration is not None, f"{pass_name} needs calibration data: pass --calib "
                                         "(text + --tokenizer, or an .npz of feeds)")
