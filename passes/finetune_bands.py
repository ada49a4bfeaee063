"""finetune-bands: learn every threshold's band (t of Threshold(x, t), which zeroes
-t <= x <= t) on calibration data with a straight-through estimator (seed 000, the trainable
+-Delta band), starting from the thresholds already set, at the same model-wide sparsity.

Run it after a pass that sets the thresholds (calibrate-thresholds, allocate-sparsity,
sequential-search, weight-scores + one of those) and before quantize-activations (which
raises thresholds to its quantizer's zero band). The target is the model-wide MAC-weighted
sparsity the thresholds have on entry, measured on the calibration data with them in place;
training moves sparsity between sites where the loss says so:

1. The model runs in PyTorch (sparsecc.torch_eval), weights constant; one level per
   Threshold is learned (t, or tau of a weight-aware one; t = exp(log t); Adam, see
   sparsecc.band_training) on the first `windows` calibration windows, `batch` a step, in an
   order drawn from `seed`. Loss: next-token cross-entropy for a token-id model, else the
   squared error against the dense outputs. A threshold at t = 0 stays there.
2. After every step one common factor on all learned t puts the model-wide sparsity back on
   the target (the entry statistics, threshold_search's MAC formula): a projection, so the
   steps only move sparsity between sites.
3. The learned t are written back (ops.set_threshold), the thresholds' inputs re-measured
   with them in place (`refine` times), and one more common factor, bisected on those
   statistics, lands the calibrated model-wide sparsity exactly on the target.

The training state (log t, Adam's moments, the loss per step) is checkpointed in the
calibration cache after every step; a rerun with the same model, data and options resumes
it. Same inputs, seed and `threads` give a byte-identical model. PyTorch is optional:
pip install -e '.[export]'.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.calibration import REFINE, collect
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassResult, require
from sparsecc.progress import bar, log
from sparsecc.threshold_search import (Checkpoint, ThresholdSearch, common_factor, group_labels, role_label, scaled_levels,
                                       thresholds_by_role, threshold_sparsity, visit_order)

INSTALL = "pip install -e '.[export]' (torch==2.13.0, the CPU build)"


@dataclasses.dataclass(frozen=True)
class FinetuneBandsConfig:
    steps: int = option(40, "optimizer steps", within="[1, inf)")
    lr: float = option(0.05, "Adam step size on log t (about the largest relative change of t per step)",
                       within="(0, inf)")
    windows: int = option(8, "calibration windows trained on (the first ones of the calibration data)",
                          within="[1, inf)")
    batch: int = option(1, "windows per step (their gradients add up)", within="[1, inf)")
    temperature: float = option(0.2, "width of the surrogate mask sigmoid((|x| - t) / tau): "
                                     "tau = temperature x the median |x| of the threshold's input", within="(0, inf)")
    seed: int = option(0, "order in which the windows are visited", within="[0, inf)")
    refine: int = option(1, "re-measurements with the learned thresholds in place before the final "
                            "common-factor correction (0: correct on the entry statistics)", within=REFINE)
    threads: int = option(1, "PyTorch threads (the model is byte-identical only for the same count; "
                             "more than 1 is slower on cores shared with other work)", within="[1, inf)")

    def __post_init__(self):
        if self.batch > self.windows:
            raise SparseccError(f"batch ({self.batch}) must not exceed windows ({self.windows})")


def import_torch():
    try:
        import torch
    except ImportError:
        raise SparseccError(f"finetune-bands needs PyTorch, which is not installed: {INSTALL}") from None
    return torch


class FinetuneBands(ThresholdSearch):
    """Learn each threshold's band by gradient descent (straight-through estimator) at the same model-wide sparsity."""

    name = "finetune-bands"
    Config = FinetuneBandsConfig

    needs = frozenset({"thresholds", "levels"})
    window_graphs_only = ("its PyTorch evaluator runs window graphs; use sequential-search or allocate-sparsity "
                          "on this model")

    def check_ahead(self, model, ctx):
        import_torch()
        super().check_ahead(model, ctx)

    def check(self, model, ctx):
        nodes = [n for n in model.graph if ops.is_threshold(n)]
        require(bool(nodes), "finetune-bands found no Threshold ops: run insert-thresholds and calibrate-thresholds "
                             "before it")
        require(any(ops.threshold_level(n) > 0 for n in nodes), "finetune-bands found every threshold at t = 0: "
                "run calibrate-thresholds (or allocate-sparsity) before it")

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        torch = import_torch()
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(self.config.threads)
        torch.use_deterministic_algorithms(True)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                return self._run(model, ctx, torch)
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)

    def _run(self, model: ir.Model, ctx: Context, torch) -> dict:
        from sparsecc import band_training as bt
        from sparsecc.torch_eval import TorchGraph

        c = self.config
        started = time.perf_counter()
        grouped, natural = thresholds_by_role(model)
        thresholds = [dataclasses.replace(th, group=th.node.name) for th in grouped]   # each on its own
        statistics = [th.source for th in thresholds] + [s.consumes for s in natural]
        hists = collect(model, statistics, ctx.calibration, ctx.cache_dir, desc="finetune: statistics")
        entry = {th.node.name: ops.threshold_level(th.node) for th in thresholds}
        entry_t = _t_arrays(thresholds)
        target = threshold_sparsity(thresholds, natural, hists, entry)
        trained = [th for th in thresholds if entry[th.node.name] > 0]
        index = {th.node.name: i for i, th in enumerate(trained)}
        tau = torch.tensor([c.temperature * (hists[th.source].threshold_for(0.5) or entry[th.node.name])
                            for th in trained], dtype=torch.float64)
        scales = [None if ops.score_scale(th.node) is None
                  else torch.from_numpy(ops.score_scale(th.node).astype(np.float64)) for th in trained]

        def on_target(levels: dict, statistics: dict) -> float:
            """The common factor on the trained levels that puts the model-wide sparsity on the target."""
            return common_factor(lambda f: threshold_sparsity(thresholds, natural, statistics, scaled_levels(levels, index, f)),
                                  target)

        graph = TorchGraph(model)
        feeds = _first_feeds(ctx.calibration, [v.name for v in model.graph.inputs], c.windows)
        first = np.asarray(next(iter(feeds[0].values())))
        kind = "cross-entropy" if np.issubdtype(first.dtype, np.integer) and first.ndim == 2 else "squared-error"
        state = Checkpoint("finetune", ctx.cache_dir, c, hists, [th.source for th in thresholds], str)
        saved, history = state.load(list(index), None)
        resumed = len(history)
        bands = (bt.BandState.from_json([saved[name] for name in index]) if history
                 else bt.BandState.start([entry[name] for name in index]))
        order = visit_order(len(feeds), c.steps * c.batch, c.seed)
        passes = collections.Counter()
        dense = [None] * len(feeds)   # the reference outputs of a squared-error loss
        if kind == "squared-error":
            with torch.no_grad():
                dense = [graph.run(f, bt.fixed_threshold({k: np.zeros_like(v) for k, v in entry_t.items()}))[0]
                         for f in feeds]
            passes["forward"] += len(feeds)

        def measured(t_arrays: dict) -> float:
            passes["forward"] += len(feeds)
            with torch.no_grad():
                threshold = bt.fixed_threshold(t_arrays)
                losses = [bt.task_loss(graph.run(f, threshold)[0], f, ref) for f, ref in zip(feeds, dense)]
            return sum(float(v) for v in losses) / len(feeds)

        before = measured(entry_t)
        training = time.perf_counter()
        for step in bar(range(resumed, c.steps), total=c.steps - resumed, desc="finetune-bands"):
            log_level = bands.log_t.clone().requires_grad_(True)
            task = 0.0
            for w in order[step * c.batch:(step + 1) * c.batch]:   # one window's graph in memory at a time
                ste = bt.ste_threshold(index, log_level.exp(), tau, scales)
                value = bt.task_loss(graph.run(feeds[w], ste)[0], feeds[w], dense[w])
                (value / c.batch).backward()
                task += float(value.detach()) / c.batch
            bands.adam_step(log_level.grad, c.lr, step + 1)
            bands.shift(on_target(entry | dict(zip(index, bands.log_t.exp().tolist())), hists))
            passes["forward"] += c.batch
            passes["backward"] += c.batch
            history.append({"step": step + 1, "loss": task})
            state.save(dict(zip(index, bands.to_json())), history)
            log(f"finetune: step {step + 1}/{c.steps}, loss {task:.4f}", level=2)
        training = time.perf_counter() - training
        learned = entry | dict(zip(index, bands.log_t.exp().tolist()))
        for th in thresholds:
            ops.set_threshold(th.node, learned[th.node.name])
        hists_now = hists
        for round_ in range(c.refine):   # re-measure with the learned thresholds in place
            hists_now = collect(model, statistics, ctx.calibration, ctx.cache_dir,
                                desc=f"finetune: re-measuring ({round_ + 1}/{c.refine})")
        factor = on_target(learned, hists_now)
        final = scaled_levels(learned, index, factor)
        for th in thresholds:
            ops.set_threshold(th.node, final[th.node.name])
        after = measured(_t_arrays(thresholds))
        seconds = time.perf_counter() - started
        done = c.steps - resumed
        log(f"finetune: loss {before:.4f} -> {after:.4f} ({kind}) at model-wide sparsity {target:.2%}; "
            f"{done} steps in {training:.0f} s, {seconds:.0f} s in all")
        labels = group_labels(model, thresholds)
        role_labels = group_labels(model, thresholds, key=lambda th: role_label(th.role))
        rows = [{"threshold": th.node.name, "label": labels[th.node.name], "role": role_label(th.role),
                 "trained": th.node.name in index,
                 "t_before": entry[th.node.name], "t_after": ops.threshold_level(th.node),
                 "sparsity_before": round(hists[th.source].sparsity_at(entry[th.node.name]), 6),
                 "sparsity_after": round(hists_now[th.source].sparsity_at(final[th.node.name]), 6)}
                for th in thresholds]
        return PassResult({
            "target": round(target, 6),
            "calibrated_model_sparsity": round(threshold_sparsity(thresholds, natural, hists_now, final), 6),
            "common_factor": factor,
            "loss": {"kind": kind, "before": before, "after": after, "windows": len(feeds)},
            "sparsity_by_role": {role: _by_role(rows)[role] | {"label": name} for role, name in role_labels.items()},
            "training": {"steps": c.steps, "resumed_at": resumed, "trained_thresholds": len(trained),
                         "frozen_thresholds": len(thresholds) - len(trained),
                         "tokens": done * c.batch * (first.size if kind == "cross-entropy" else len(first)),
                         "forward_passes": passes["forward"], "backward_passes": passes["backward"],
                         "seconds": round(seconds, 3), "training_seconds": round(training, 3),
                         "seconds_per_step": round(training / done, 3) if done else None},
            "history": [{"step": h["step"], "loss": round(h["loss"], 6)} for h in history],
            "thresholds": rows,
        })


def _first_feeds(source, inputs: list[str], count: int) -> list[dict]:
    feeds = []
    for feed in source.feeds(inputs):
        feeds.append(feed)
        if len(feeds) == count:
            break
    return feeds


def _t_arrays(thresholds) -> dict[str, np.ndarray]:
    """Each Threshold's t as stored (a scalar, or a vector for a weight-aware one)."""
    return {th.node.name: np.array(th.node.inputs[1].const_value.numpy()) for th in thresholds}


def _by_role(rows: list[dict]) -> dict:
    """Mean sparsity before/after of the thresholds of each role."""
    roles: dict[str, list] = collections.defaultdict(list)
    for r in rows:
        roles[r["role"]].append(r)
    return {role: {key: round(sum(r[f"sparsity_{key}"] for r in rs) / len(rs), 6) for key in ("before", "after")}
            for role, rs in sorted(roles.items())}
