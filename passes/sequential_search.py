"""sequential-search: the loss-monitored search of the RWKV-on-SENECA paper (seed 003).

Thresholds in graph order (blocks first to last, a block's sites in order). For each, try
the candidate sparsities and keep the highest whose loss stays at or below `loss_inc` x the
base loss; accept it, and its loss becomes the new base (so the allowance compounds). The
search for a threshold starts at the level most often chosen so far for thresholds of its
role (the paper's warm start, about 3x fewer trials): up from there while the loss allows,
down from there until it does. `loss_inc` is the accuracy/efficiency knob; the model-wide
sparsity is what comes out.

Loss, trials in one ONNX Runtime session, checkpointing (resume) and the report of forward
passes and wall time are shared with allocate-sparsity (`sparsecc.threshold_search`).
"""
from __future__ import annotations

import collections
import dataclasses
import time

import onnx_ir as ir

from sparsecc.calibration import REFINE
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassResult
from sparsecc.progress import bar
from sparsecc.threshold_search import (Checkpoint, ThresholdSearch, LossProbe, dense_statistics, group_labels, model_sparsity,
                                      role_label, settle, thresholds_by_role)


@dataclasses.dataclass(frozen=True)
class SequentialSearchConfig:
    loss_inc: float = option(1.001, "a threshold's sparsity is accepted while the loss stays at or below "
                                    "loss_inc x the loss before it (the allowance compounds)", within="[1, inf)")
    step: float = option(0.1, "candidate sparsities: step, 2 x step, ... up to max_level")
    max_level: float = option(0.9, "the highest candidate sparsity")
    warm_start: bool = option(True, "start at the level most often chosen so far for the threshold's role")
    windows: int = option(4, "calibration windows the loss is measured on", within="[1, inf)")
    refine: int = option(1, "re-calibrations with the thresholds in place", within=REFINE)

    def __post_init__(self):
        if not 0.0 < self.step <= self.max_level < 1.0:
            raise SparseccError(f"need 0 < step <= max_level < 1 (got step {self.step}, max_level {self.max_level})")


class SequentialSearch(ThresholdSearch):
    """Per threshold in graph order, the highest sparsity whose loss stays within loss_inc x the running base."""

    name = "sequential-search"
    Config = SequentialSearchConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        c = self.config
        started = time.perf_counter()
        grouped, natural = thresholds_by_role(model)
        thresholds = [dataclasses.replace(th, group=(th.role, i)) for i, th in enumerate(grouped)]  # each on its own
        hists = dense_statistics(model, thresholds, natural, ctx, "sequential")
        groups = [th.group for th in thresholds]
        state = Checkpoint("sequential", ctx.cache_dir, c, hists, [th.source for th in thresholds], _label)
        levels, history = state.load(groups, 0.0)
        resumed = bool(history)
        probe = LossProbe(model, thresholds, hists, ctx, c.windows)
        try:
            base = dense = probe.loss(dict.fromkeys(groups, 0.0))
            if history:
                base = history[-1]["loss"]
            chosen: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
            for step in history:
                chosen[_role_of(step["threshold"], thresholds)][step["level"]] += 1
            done = {step["threshold"] for step in history}
            for th in bar([th for th in thresholds if _label(th.group) not in done], desc="sequential search"):
                budget = c.loss_inc * base
                level, loss, tried = self._search(probe, levels, th.group, budget, chosen[th.role], base)
                levels = levels | {th.group: level}
                base = loss
                chosen[th.role][level] += 1
                history.append({"threshold": _label(th.group), "level": level, "loss": loss, "budget": budget,
                                "trials": tried})
                state.save(levels, history)
        finally:
            probe.close()
        settle(model, thresholds, hists, levels, ctx, c.refine, "sequential")
        by_role = collections.defaultdict(list)
        for th in thresholds:
            by_role[role_label(th.role)].append(levels[th.group])
        labels = group_labels(model, thresholds, key=lambda th: _label(th.group))
        return PassResult({
            "loss_inc": c.loss_inc,
            "calibrated_model_sparsity": round(model_sparsity(thresholds, natural, hists, levels), 6),
            "loss": {"dense": dense, "searched": base, "kind": probe.kind},
            "mean_sparsity_by_role": {role: round(sum(v) / len(v), 4) for role, v in sorted(by_role.items())},
            "role_labels": group_labels(model, thresholds, key=lambda th: role_label(th.role)),
            "search": {"thresholds": len(thresholds), "forward_passes": probe.passes, "resumed": resumed,
                       "seconds": round(time.perf_counter() - started, 3)},
            "history": [step | {"label": labels[step["threshold"]]} for step in history],
        })

    def _search(self, probe, levels, group, budget, chosen: collections.Counter, base):
        """(accepted level, its loss, trials): the highest candidate within `budget`."""
        c = self.config
        candidates = [round(c.step * i, 6) for i in range(1, int(c.max_level / c.step + 1e-9) + 1)]
        start = 0
        if c.warm_start and chosen:
            favourite = max(chosen, key=lambda lv: (chosen[lv], -lv))
            start = next((i for i, lv in enumerate(candidates) if lv >= favourite), 0)
        accepted, loss, tried = 0.0, base, 0
        i = start
        if start > 0:   # warm start: step down until the favourite's neighbourhood fits the budget
            while i >= 0:
                tried += 1
                trial = probe.loss(levels | {group: candidates[i]})
                if trial <= budget:
                    accepted, loss = candidates[i], trial
                    break
                i -= 1
            if i < 0:
                return accepted, loss, tried
            i += 1
        while i < len(candidates):   # then up while the budget allows
            tried += 1
            trial = probe.loss(levels | {group: candidates[i]})
            if trial > budget:
                break
            accepted, loss = candidates[i], trial
            i += 1
        return accepted, loss, tried


def _label(group: tuple) -> str:
    role, index = group
    return f"{index}: {role_label(role)}"


def _role_of(label: str, thresholds) -> tuple:
    return next(th.role for th in thresholds if _label(th.group) == label)
