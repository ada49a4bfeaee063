"""allocate-sparsity: meet a model-wide MAC-weighted sparsity target with different sparsity
for different sites, chosen by measured loss (not the same level everywhere).

Thresholds are grouped by site role (the shapes of the sites they feed: q/k/v, o, gate/up,
down in a Llama block), and with `bands` > 1 also by depth (contiguous bands of layers).
Starting every group at `start`, a greedy search raises by `step` the sparsity of whichever
group costs the least loss per MAC saved, until the model-wide target is met (the last move
is bisected to land on it). Loss: next-token cross-entropy on `windows` calibration windows
for a token-id model, else the squared error against the dense outputs. Costs are
re-measured lazily: the best candidate is measured again in the current state and taken only
if it is still the best.

The search runs in one ONNX Runtime session with the thresholds as inputs, checkpoints its
state after every move in the calibration cache (a rerun with the same model, data and
options resumes it), and reports its forward passes and wall time. Thresholds come from the
same streamed |x| histograms as calibrate-thresholds, re-measured with the thresholds in
place (`refine`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.calibration import AbsHistogram, collect
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, Pass, require, require_calibration
from sparsecc.progress import log
from sparsecc.runtime import load_session, saved_copy
from sparsecc.sites import analyze

MAX_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class AllocateSparsityConfig:
    sparsity: float = option(0.5, "model-wide MAC-weighted sparsity target in [0, 0.95)")
    step: float = option(0.05, "sparsity a greedy move adds to one group")
    bands: int = option(1, "split the layers into this many bands of depth; groups = site role x band")
    start: float = option(0.0, "every group's sparsity before the search (a floor that shortens it)")
    windows: int = option(4, "calibration windows the loss is measured on")
    refine: int = option(1, "re-calibrations with the thresholds in place")

    def __post_init__(self):
        if not 0.0 <= self.sparsity < MAX_LEVEL:
            raise SparseccError(f"sparsity must be in [0, {MAX_LEVEL}) (got {self.sparsity})")
        if not 0.0 < self.step <= 0.5:
            raise SparseccError(f"step must be in (0, 0.5] (got {self.step})")
        if self.bands < 1 or self.windows < 1 or self.refine < 0:
            raise SparseccError("bands and windows must be at least 1, refine at least 0")
        if not 0.0 <= self.start <= self.sparsity:
            raise SparseccError(f"start must be in [0, sparsity] (got {self.start})")


@dataclasses.dataclass
class _Threshold:
    node: ir.Node
    macs: int
    group: tuple

    @property
    def source(self) -> str:
        return self.node.inputs[0].name


class AllocateSparsity(Pass):
    """Allocate sparsity across site roles (and depth bands) by measured loss to meet a model-wide target."""

    name = "allocate-sparsity"
    Config = AllocateSparsityConfig

    def check(self, model, ctx):
        require_calibration(ctx, self.name)
        require(any(ops.is_threshold(n) for n in model.graph),
                "allocate-sparsity found no Threshold ops: run insert-thresholds before it")

    def run(self, model: ir.Model, ctx: Context) -> dict:
        c = self.config
        started = time.perf_counter()
        thresholds, natural = self._thresholds(model)
        for th in thresholds:       # measured dense
            _set_t(th.node, 0.0)
        hists = collect(model, [th.source for th in thresholds] + [s.consumes for s in natural], ctx.calibration,
                        ctx.cache_dir, desc="allocate: statistics")
        groups = sorted({th.group for th in thresholds})
        total = sum(th.macs for th in thresholds) + sum(s.macs_per_token for s in natural)
        fixed = sum(s.macs_per_token * hists[s.consumes].zeros for s in natural)

        def model_wide(levels: dict) -> float:
            return (fixed + sum(th.macs * max(levels[th.group], hists[th.source].zeros) for th in thresholds)) / total

        search = _Search(model, thresholds, hists, ctx, c.windows)
        state = _Checkpoint(ctx.cache_dir, c, hists, [th.source for th in thresholds])
        levels, history = state.load(groups, c.start)
        resumed = bool(history)
        try:
            loss = search.loss(levels)
            base = search.loss(dict.fromkeys(groups, 0.0))
            stale: dict = {}
            while model_wide(levels) < c.sparsity - 1e-9:
                open_ = [g for g in groups if levels[g] < MAX_LEVEL]
                if not open_:
                    raise SparseccError(f"every group is at {MAX_LEVEL:.0%} and the model-wide sparsity is "
                                        f"{model_wide(levels):.1%}: the target {c.sparsity:.0%} cannot be met")
                for g in open_:
                    if g not in stale:
                        stale[g] = self._cost(search, levels, g, loss, model_wide)
                while True:   # lazy greedy: re-measure the best, take it if it stays the best
                    best = min(open_, key=lambda g: stale[g][0])
                    fresh = self._cost(search, levels, best, loss, model_wide)
                    stale[best] = fresh
                    if fresh[0] <= min(stale[g][0] for g in open_):
                        break
                levels, loss = fresh[1], fresh[2]
                del stale[best]
                if model_wide(levels) > c.sparsity:   # land on the target: bisect the last move
                    low, high = levels[best] - c.step, levels[best]
                    for _ in range(30):
                        mid = (low + high) / 2
                        low, high = (mid, high) if model_wide(levels | {best: mid}) < c.sparsity else (low, mid)
                    levels = levels | {best: high}
                    loss = search.loss(levels)
                history.append({"group": _label(best), "level": round(levels[best], 6), "loss": loss,
                                "model_sparsity": round(model_wide(levels), 6)})
                state.save(levels, history)
                log(f"allocate: {_label(best)} -> {levels[best]:.0%}, loss {loss:.4f}, "
                    f"model-wide {model_wide(levels):.1%}", level=2)
        finally:
            search.close()
        for _ in range(c.refine):   # the thresholds' inputs as they are seen behind the upstream ones
            _apply(thresholds, hists, levels)
            hists |= collect(model, [th.source for th in thresholds], ctx.calibration, ctx.cache_dir,
                             desc="allocate: refine")
        _apply(thresholds, hists, levels)
        return {
            "changed": True, "target": c.sparsity, "calibrated_model_sparsity": round(model_wide(levels), 6),
            "groups": [{"group": _label(g), "sparsity": round(levels[g], 6),
                        "macs_per_token": sum(th.macs for th in thresholds if th.group == g)} for g in groups],
            "loss": {"dense": base, "allocated": loss, "kind": search.kind},
            "search": {"moves": len(history), "forward_passes": search.passes, "resumed": resumed,
                       "seconds": round(time.perf_counter() - started, 3)},
            "thresholds": [{"threshold": th.node.name, "group": _label(th.group),
                            "t": float(th.node.inputs[1].const_value.numpy())} for th in thresholds],
        }

    def _thresholds(self, model: ir.Model):
        sites = analyze(model.graph).sites
        nodes = [n for n in model.graph if ops.is_threshold(n)]
        fed = {n.name: [s for s in sites if s.threshold == n.name] for n in nodes}
        roles = {n.name: tuple(sorted((s.in_features, s.out_features) for s in fed[n.name])) for n in nodes}
        count = {r: sum(1 for n in nodes if roles[n.name] == r) for r in set(roles.values())}
        seen: dict = {}
        out = []
        for n in nodes:   # graph order: depth
            role = roles[n.name]
            index = seen[role] = seen.get(role, -1) + 1
            band = index * self.config.bands // count[role]
            out.append(_Threshold(n, sum(s.macs_per_token for s in fed[n.name]), (role, band)))
        natural = [s for s in sites if s.natural and not s.head]
        return out, natural

    def _cost(self, search, levels, group, loss, model_wide):
        """(loss added per MAC-weighted sparsity gained, the levels, their loss) of one move."""
        moved = levels | {group: min(levels[group] + self.config.step, MAX_LEVEL)}
        gained = model_wide(moved) - model_wide(levels)
        new = search.loss(moved)
        return ((new - loss) / gained if gained > 0 else float("inf")), moved, new


def _label(group: tuple) -> str:
    role, band = group
    return "+".join(f"{k}x{n}" for k, n in role) + f" band {band}"


def _set_t(node: ir.Node, t: float) -> None:
    dtype = node.inputs[1].dtype.numpy() if node.inputs[1].dtype is not None else np.float32
    node.inputs[1].const_value = ir.tensor(np.array(t, dtype), name=node.inputs[1].name)


def _apply(thresholds: list[_Threshold], hists: dict[str, AbsHistogram], levels: dict) -> None:
    for th in thresholds:
        _set_t(th.node, hists[th.source].threshold_for(levels[th.group]))


class _Search:
    """The model in one ONNX Runtime session with every threshold's t as an input."""

    def __init__(self, model: ir.Model, thresholds: list[_Threshold], hists: dict, ctx: Context, windows: int):
        self.thresholds, self.hists, self.passes = thresholds, hists, 0
        graph = model.graph
        self.restore = []
        for th in thresholds:   # t: initializer -> graph input, for the session's lifetime
            t = th.node.inputs[1]
            del graph.initializers[t.name]
            graph.inputs.append(t)
            self.restore.append(t)
        try:
            with saved_copy(model) as files:
                self.session = load_session(files[0])
        finally:
            for t in self.restore:
                graph.inputs.remove(t)
                graph.register_initializer(t)
        names = [i.name for i in self.session.get_inputs() if i.name not in {t.name for t in self.restore}]
        self.feeds = []
        for feed in ctx.calibration.feeds(names):
            self.feeds.append(feed)
            if len(self.feeds) == windows:
                break
        ids = self.feeds[0][names[0]]
        self.kind = "cross-entropy" if np.issubdtype(ids.dtype, np.integer) and ids.ndim == 2 else "squared-error"
        self.dense = None
        if self.kind == "squared-error":
            self.dense = [self._run(dict.fromkeys({th.group for th in thresholds}, 0.0), f) for f in self.feeds]

    def _run(self, levels: dict, feed: dict) -> np.ndarray:
        ts = {th.node.inputs[1].name: np.array(self.hists[th.source].threshold_for(levels[th.group]),
                                               th.node.inputs[1].dtype.numpy()) for th in self.thresholds}
        self.passes += 1
        return self.session.run(None, feed | ts)[0]

    def loss(self, levels: dict) -> float:
        total = 0.0
        for i, feed in enumerate(self.feeds):
            out = self._run(levels, feed).astype(np.float64)
            if self.kind == "cross-entropy":
                ids = next(iter(feed.values()))
                logits = out[:, :-1]
                logits = logits - logits.max(axis=-1, keepdims=True)
                logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
                total += float(-np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean())
            else:
                total += float(np.mean((out - self.dense[i]) ** 2))
        return total / len(self.feeds)

    def close(self) -> None:
        self.session = None


class _Checkpoint:
    """The search state after each move, in the cache, under a key of the statistics and options."""

    def __init__(self, cache_dir: Path | None, config, hists: dict, sources: list[str]):
        self.path = None
        if cache_dir is not None:
            digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
            for name in sources:
                digest.update(name.encode())
                digest.update(hists[name].counts.tobytes())
            self.path = Path(cache_dir) / f"allocate-{digest.hexdigest()[:32]}.json"

    def load(self, groups: list, start: float) -> tuple[dict, list]:
        levels = dict.fromkeys(groups, start)
        if self.path is None or not self.path.is_file():
            return levels, []
        saved = json.loads(self.path.read_text())
        by_label = {_label(g): g for g in groups}
        log(f"allocate: resuming a search of {len(saved['history'])} moves from {self.path.name}")
        return levels | {by_label[k]: v for k, v in saved["levels"].items()}, saved["history"]

    def save(self, levels: dict, history: list) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"levels": {_label(g): v for g, v in levels.items()}, "history": history}))
        os.replace(tmp, tmp.with_name(self.path.name))
