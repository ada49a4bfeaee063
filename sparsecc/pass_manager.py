"""Passes and the pass manager.

A pass is a small class with a stable kebab-case `name`, a typed `Config` (see
sparsecc.config), a declaration of the facts about the model it `needs` and `provides` (and
those that must not hold yet: `before`) and whether it `needs_data`, checks that hold for
the whole run in `check_ahead`, checks on the model as it reaches the pass in `check`, and
`run`, which edits the model in place and returns a PassResult. The manager checks the whole
pipeline (order, data, `check_ahead`) before the first pass runs, then runs the passes in
order, verifies the graph after each, times them, and dumps the IR after the passes named
in `dump_after`.
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


# What a pass can need of the model and provide to the passes after it: what the fact means,
# for the error that names it.
FACTS = {
    "thresholds": "Threshold ops",
    "levels": "thresholds set to a sparsity",
    "int8-events": "int8 events (QuantizeLinear on activations)",
    "int8-weights": "integer weights (quantize-weights)",
}


def model_facts(model: ir.Model) -> set[str]:
    """The facts that already hold on a model as it enters the pipeline."""
    from sparsecc import ops

    thresholds = [n for n in model.graph if ops.is_threshold(n)]
    facts = {"thresholds"} if thresholds else set()
    if any(ops.threshold_level(n) > 0 for n in thresholds):
        facts.add("levels")
    if any(n.op_type == "QuantizeLinear" for n in model.graph):
        facts.add("int8-events")
    if any(n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None for n in model.graph):
        facts.add("int8-weights")
    return facts


@dataclasses.dataclass
class PassResult:
    """What a pass reports: JSON-able details for report.json, and whether it changed the model."""

    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    changed: bool = True


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    pass


class Pass:
    name: ClassVar[str]
    Config: ClassVar[type] = EmptyConfig
    needs: ClassVar[frozenset[str]] = frozenset()     # FACTS that must hold when it runs
    provides: ClassVar[frozenset[str]] = frozenset()  # FACTS that hold after it
    before: ClassVar[frozenset[str]] = frozenset()    # FACTS that must not hold yet when it runs
    needs_data: ClassVar[bool] = False                # calibration data in the context

    def __init__(self, config: Any = None, *, id: str | None = None, **options: Any):
        if config is not None and options:
            raise TypeError("give a config object or keyword options, not both")
        if config is not None:
            try:
                cfg.check_ranges(type(config), dataclasses.asdict(config))
            except SparseccError as exc:
                raise SparseccError(f"{self.name}: {exc}") from None
        self.config = config if config is not None else cfg.build(self.Config, options, self.name)
        self.id = id or self.name

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def check_ahead(self, model: ir.Model, ctx: Context) -> None:
        """Raise PreconditionError when the pass cannot run in this run at all: the kind of model
        (passes do not change it), the context, what must be installed. Called before any pass runs."""

    def check(self, model: ir.Model, ctx: Context) -> None:
        """Raise PreconditionError when the pass cannot run on `model` as it reaches the pass."""

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
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

    def check(self, model: ir.Model, ctx: Context) -> None:
        """Refuse the whole pipeline in one line before any pass runs: a pass placed before the
        passes that provide what it needs (or after one that provides what must not hold yet), a
        pass that needs calibration data without any, a pass that cannot run on this model."""
        facts = model_facts(model)
        for step, p in enumerate(self.passes):
            p.check_ahead(model, ctx)   # the kind of model first: no order would make it run
            if p.needs_data:
                require_calibration(ctx, p.id)
            fact = _first(p.needs - facts)
            if fact:
                raise PreconditionError(f"pipeline order: {p.id} needs {FACTS.get(fact, fact)}, which no pass before it "
                                        f"provides; put {_providers(fact)} before it")
            fact = _first(p.before & facts)
            if fact:
                where = next((q.id for q in self.passes[:step] if fact in q.provides), None)
                raise PreconditionError(f"pipeline order: {p.id} must run before {FACTS.get(fact, fact)} "
                                        + (f"(by {where}); move it before {where}" if where else
                                           "and the model's are set already; start from the model before they were set"))
            facts |= p.provides

    def run(self, model: ir.Model, ctx: Context) -> list[PassReport]:
        self.check(model, ctx)
        reports = []
        for step, p in enumerate(self.passes, 1):
            log(f"[{step}/{len(self.passes)}] {p.id}")
            p.check(model, ctx)
            start = time.perf_counter()
            result = p.run(model, ctx)
            seconds = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise SparseccError(f"pass {p.id} returned a {type(result).__name__}: a pass's run returns a "
                                    "sparsecc.pass_manager.PassResult(details, changed)")
            changed, details = result.changed, result.details
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


def _first(facts: set[str]) -> str | None:
    """The fact named first in FACTS (a pass's own facts after them, sorted)."""
    order = list(FACTS)
    return min(facts, key=lambda f: (order.index(f) if f in order else len(order), f), default=None)


def _providers(fact: str) -> str:
    """The registered passes that provide `fact`, for an error's fix."""
    from sparsecc import passes

    names = [name for name, p in passes.registry().items() if fact in p.provides]
    return " or ".join(names[:2]) + (" (or another that does)" if len(names) > 2 else "") if names else "a pass that provides it"


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
