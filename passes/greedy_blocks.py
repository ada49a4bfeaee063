"""greedy-blocks: TEAL's greedy block-wise allocation.

Per block (found from graph structure, see sparsecc.blocks; a model whose threshold roles have
no common count is one block, the whole model), start dense and repeatedly raise the sparsity
of whichever threshold increases the block-output error least (q/k/v share one threshold
unless insert-thresholds' per_consumer gives each its own, as TEAL has it), until the
block's MAC-weighted sparsity (its naturally sparse sites counted) meets the target; the last
move is bisected to land on it. Every move saves the same MACs: a group's level rises by
`step` x block MACs / the group's MACs (TEAL: 0.025 scaled by the projection's parameter
share), so the least error is also the least error per MAC saved.

Error: squared difference of the block's output from its dense output on `windows`
calibration windows, with only that block's thresholds active, so each block sees dense
inputs (TEAL's layer-wise setting). Each block runs as its own ONNX Runtime session fed with
the dense model's tensors at its boundary: a trial costs one block, not the whole model.

For comparison the report gives each block's error at one uniform level meeting the same
block target (TEAL reports ~10% lower block error than uniform at 40-50%). The levels are then
settled into thresholds from the streamed |x| histograms, re-measured with the thresholds in
place (`refine`), as the other searches do. Resumable: the state is checkpointed in the
calibration cache after every move.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import onnx_ir as ir

from sparsecc import ops
from sparsecc.calibration import REFINE
from sparsecc.blocks import BlockProbe, dense_boundaries, find_blocks
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassResult
from sparsecc.progress import bar, log
from sparsecc.site_names import layers_label, threshold_names
from sparsecc.threshold_search import (Checkpoint, ThresholdSearch, dense_statistics, group_labels, model_sparsity, role_label, settle,
                                      thresholds_by_role)

MAX_LEVEL = 0.95   # the highest level a group may reach (as in allocate-sparsity)


@dataclasses.dataclass(frozen=True)
class GreedyBlocksConfig:
    sparsity: float = option(0.5, "every block's MAC-weighted sparsity target", within=f"[0, {MAX_LEVEL})")
    step: float = option(0.025, "block sparsity one greedy move adds: a group's level rises by "
                                "step x block MACs / the group's MACs (TEAL: 0.025)", within="(0, 0.5]")
    windows: int = option(4, "calibration windows the block-output error is measured on", within="[1, inf)")
    refine: int = option(1, "re-calibrations with the thresholds in place", within=REFINE)


class GreedyBlocks(ThresholdSearch):
    """TEAL's greedy allocation: per block, raise the group whose move adds the least block-output error."""

    name = "greedy-blocks"
    Config = GreedyBlocksConfig
    window_graphs_only = "it cuts blocks out of a window graph; use sequential-search or allocate-sparsity on this model"

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        c = self.config
        started = time.perf_counter()
        grouped, natural = thresholds_by_role(model)
        blocks, thresholds = find_blocks(model, grouped)
        hists = dense_statistics(model, thresholds, natural, ctx, "greedy-blocks")
        groups = [th.group for th in thresholds]
        state = Checkpoint("greedy-blocks", ctx.cache_dir, c, hists, [th.source for th in thresholds], _label)
        levels, history = state.load(groups, 0.0)
        resumed = bool(history)
        done = {h["block"]: h for h in history if h.get("done")}
        boundaries, model_passes, block_passes = None, 0, 0
        for block in bar([b for b in blocks if b.index not in done], desc="greedy-blocks", unit="block"):
            if boundaries is None:   # one dense pass per window, only when some block is left to search
                names = [v.name for v in model.graph.inputs]
                feeds = [f for f, _ in zip(ctx.calibration.feeds(names), range(c.windows))]
                boundaries = dense_boundaries(model, blocks, feeds)
                model_passes += len(feeds)
            probe = BlockProbe(model, block, hists, boundaries)
            levels, summary = self._search(block, probe, levels, history, state)
            done[block.index] = summary
            history.append(summary)
            state.save(levels, history)
            block_passes += probe.passes
            log(f"greedy-blocks: [{block.index + 1}/{len(blocks)}] block {block.index}: "
                + ", ".join(f"{_slot_label(th.group)} {levels[th.group]:.0%}" for th in block.thresholds)
                + f"; error {summary['error']:.3g} vs uniform {summary['uniform_error']:.3g}")
        settle(model, thresholds, hists, levels, ctx, c.refine, "greedy-blocks")
        return self._report(model, blocks, thresholds, natural, hists, levels, done, history,
                            (model_passes, block_passes), resumed, started)

    def _search(self, block, probe: BlockProbe, levels: dict, history: list, state: Checkpoint):
        """Greedy moves on one block from `levels` to its target; (levels, the block's summary)."""
        c = self.config
        mine = [th.group for th in block.thresholds]
        macs = {th.group: th.macs for th in block.thresholds}
        error = probe.error(levels)
        moves = sum(1 for h in history if h["block"] == block.index and not h.get("done"))
        while block.sparsity(probe.hists, levels) < c.sparsity - 1e-9:
            open_ = [g for g in mine if levels[g] < MAX_LEVEL]
            if not open_:
                raise SparseccError(f"block {block.index} has every group at {MAX_LEVEL:.0%} and is at "
                                    f"{block.sparsity(probe.hists, levels):.1%}: the target {c.sparsity:.0%} "
                                    f"cannot be met")
            trials = {}
            for g in open_:
                moved = levels | {g: min(levels[g] + c.step * block.macs / macs[g], MAX_LEVEL)}
                trials[g] = (probe.error(moved), moved)
            best = min(open_, key=lambda g: trials[g][0])   # ties: the first in graph order
            before = levels[best]
            error, levels = trials[best]
            if block.sparsity(probe.hists, levels) > c.sparsity + 1e-9:   # land on the target: bisect the last move
                low, high = before, levels[best]
                for _ in range(40):
                    mid = (low + high) / 2
                    below = block.sparsity(probe.hists, levels | {best: mid}) < c.sparsity
                    low, high = (mid, high) if below else (low, mid)
                levels = levels | {best: high}
                error = probe.error(levels)
            moves += 1
            history.append({"block": block.index, "group": _label(best), "level": round(levels[best], 6),
                            "error": error, "block_sparsity": round(block.sparsity(probe.hists, levels), 6)})
            state.save(levels, history)
            log(f"greedy-blocks: block {block.index}: {_label(best)} -> {levels[best]:.1%}, error {error:.4g}", level=2)
        uniform = _uniform_level(block, probe.hists, c.sparsity)
        uniform_error = probe.error(levels | dict.fromkeys(mine, uniform))
        return levels, {"block": block.index, "done": True, "error": error, "uniform_level": round(uniform, 6),
                        "uniform_error": uniform_error, "moves": moves}

    def _report(self, model, blocks, thresholds, natural, hists, levels, done, history, passes, resumed,
                started) -> dict:
        names = threshold_names(model.graph)
        labels = group_labels(model, thresholds)
        rows = []
        for block in blocks:
            summary = done[block.index]
            spans = layers_label(n for th in block.thresholds for n in names[th.node.name])
            rows.append({"block": block.index, "label": spans or "the whole model", "output": block.output.name,
                         "macs_per_token": block.macs,
                         "levels": {_slot_label(th.group): round(levels[th.group], 6) for th in block.thresholds},
                         "sparsity": round(block.sparsity(hists, levels), 6), "error": summary["error"],
                         "uniform_level": summary["uniform_level"], "uniform_error": summary["uniform_error"],
                         "moves": summary["moves"]})
        ratios = [r["error"] / r["uniform_error"] for r in rows if r["uniform_error"] > 0]
        by_role = collections.defaultdict(list)
        for th in thresholds:
            by_role[role_label(th.role)].append(levels[th.group])
        return PassResult({
            "target": self.config.sparsity,
            "calibrated_model_sparsity": round(model_sparsity(thresholds, natural, hists, levels), 6),
            "blocks": rows,
            "error_vs_uniform": {"mean_ratio": round(sum(ratios) / len(ratios), 6) if ratios else None,
                                 "blocks_at_or_below_uniform": sum(r["error"] <= r["uniform_error"] for r in rows),
                                 "blocks": len(rows)},
            "mean_sparsity_by_role": {role: round(sum(v) / len(v), 4) for role, v in sorted(by_role.items())},
            "role_labels": group_labels(model, thresholds, key=lambda th: role_label(th.role)),
            "search": {"blocks": len(blocks), "moves": sum(1 for h in history if not h.get("done")),
                       "forward_passes": sum(passes), "model_passes": passes[0], "block_passes": passes[1],
                       "resumed": resumed,
                       "seconds": round(time.perf_counter() - started, 3)},
            "thresholds": [{"threshold": th.node.name, "label": labels[th.group], "block": th.group[1],
                            "group": _label(th.group), "level": round(levels[th.group], 6),
                            "t": ops.threshold_level(th.node)} for th in thresholds],
        })


def _uniform_level(block, hists: dict, target: float) -> float:
    """One level for all the block's groups that meets its target (bisection: monotone)."""
    groups = [th.group for th in block.thresholds]
    if block.sparsity(hists, dict.fromkeys(groups, 0.0)) >= target:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if block.sparsity(hists, dict.fromkeys(groups, mid)) < target else (low, mid)
    return high


def _label(group: tuple) -> str:
    role, block, slot = group
    return f"block {block}: {_slot_label(group)}"


def _slot_label(group: tuple) -> str:
    """A threshold's role within its block, e.g. 576x1536+576x1536 (128x64 #2 for a second one)."""
    role, _, slot = group
    return role_label(role) + (f" #{slot + 1}" if slot else "")
