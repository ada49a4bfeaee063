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
import time

import onnx_ir as ir

from sparsecc import ops
from sparsecc.calibration import REFINE
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassResult
from sparsecc.progress import bar, log
from sparsecc.threshold_search import (Checkpoint, ThresholdSearch, LossProbe, dense_statistics, group_labels, model_sparsity,
                                      role_label, settle, thresholds_by_role)

MAX_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class AllocateSparsityConfig:
    sparsity: float = option(0.5, "model-wide MAC-weighted sparsity target", within=f"[0, {MAX_LEVEL})")
    step: float = option(0.05, "sparsity a greedy move adds to one group", within="(0, 0.5]")
    bands: int = option(1, "split the layers into this many bands of depth; groups = site role x band",
                        within="[1, inf)")
    start: float = option(0.0, "every group's sparsity before the search (a floor that shortens it)")
    windows: int = option(4, "calibration windows the loss is measured on", within="[1, inf)")
    refine: int = option(1, "re-calibrations with the thresholds in place", within=REFINE)

    def __post_init__(self):
        if not 0.0 <= self.start <= self.sparsity:
            raise SparseccError(f"start must be in [0, sparsity] (got {self.start})")


class AllocateSparsity(ThresholdSearch):
    """Allocate sparsity across site roles (and depth bands) by measured loss to meet a model-wide target."""

    name = "allocate-sparsity"
    Config = AllocateSparsityConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        c = self.config
        started = time.perf_counter()
        thresholds, natural = thresholds_by_role(model, c.bands)
        hists = dense_statistics(model, thresholds, natural, ctx, "allocate")
        groups = sorted({th.group for th in thresholds})

        def model_wide(levels: dict) -> float:
            return model_sparsity(thresholds, natural, hists, levels)

        search = LossProbe(model, thresholds, hists, ctx, c.windows)
        state = Checkpoint("allocate", ctx.cache_dir, c, hists, [th.source for th in thresholds], _label)
        levels, history = state.load(groups, c.start)
        resumed = bool(history)
        # the way to the target, in percent: the moves' count is not known ahead, their gains add up to it
        way = bar(total=100, desc="allocate-sparsity", unit="%")

        def advance():
            way.update(max(0, min(100, int(100 * model_wide(levels) / c.sparsity) if c.sparsity else 100) - way.n))

        try:
            loss = search.loss(levels)
            base = search.loss(dict.fromkeys(groups, 0.0))
            stale: dict = {}
            advance()
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
                advance()
                log(f"allocate: {_label(best)} -> {levels[best]:.0%}, loss {loss:.4f}, "
                    f"model-wide {model_wide(levels):.1%}", level=2)
        finally:
            way.close()
            search.close()
        settle(model, thresholds, hists, levels, ctx, c.refine, "allocate")
        labels, own = group_labels(model, thresholds), group_labels(model, thresholds, key=lambda th: th.node.name)
        return PassResult({
            "target": c.sparsity, "calibrated_model_sparsity": round(model_wide(levels), 6),
            "groups": [{"group": _label(g), "label": labels[g], "sparsity": round(levels[g], 6),
                        "macs_per_token": sum(th.macs for th in thresholds if th.group == g)} for g in groups],
            "loss": {"dense": base, "allocated": loss, "kind": search.kind},
            "search": {"moves": len(history), "forward_passes": search.passes, "resumed": resumed,
                       "seconds": round(time.perf_counter() - started, 3)},
            "thresholds": [{"threshold": th.node.name, "label": own[th.node.name], "group": _label(th.group),
                            "t": ops.threshold_level(th.node)} for th in thresholds],
        })

    def _cost(self, search, levels, group, loss, model_wide):
        """(loss added per MAC-weighted sparsity gained, the levels, their loss) of one move."""
        moved = levels | {group: min(levels[group] + self.config.step, MAX_LEVEL)}
        gained = model_wide(moved) - model_wide(levels)
        new = search.loss(moved)
        return ((new - loss) / gained if gained > 0 else float("inf")), moved, new


def _label(group: tuple) -> str:
    role, band = group
    return f"{role_label(role)} band {band}"
