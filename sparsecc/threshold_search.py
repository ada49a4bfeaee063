"""Shared machinery of the threshold searches (allocate-sparsity, sequential-search): the
thresholds grouped by site role, their loss measured in one ONNX Runtime session with every
t as an input, and a checkpoint of a search's state in the calibration cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from sparsecc import compensation, ops
from sparsecc.calibration import AbsHistogram, collect, statistic
from sparsecc.model_io import atomic_write
from sparsecc.pass_manager import Context, Pass, require, require_thresholds
from sparsecc.progress import log
from sparsecc.runtime import load_session, saved_copy
from sparsecc.site_names import label, threshold_names
from sparsecc.sites import analyze
from sparsecc.stepgraph import is_step_graph


class ThresholdSearch(Pass):
    """Base of the passes that set the thresholds' levels on calibration data (calibrate-thresholds
    and the searches): they need Threshold ops and data, provide levels, and, where
    `window_graphs_only` gives the reason and the alternative, refuse step graphs up front."""

    needs = frozenset({"thresholds"})
    provides = frozenset({"levels"})
    needs_data = True
    window_graphs_only: ClassVar[str | None] = None

    def check_ahead(self, model: ir.Model, ctx: Context) -> None:
        require(self.window_graphs_only is None or not is_step_graph(model),
                f"{self.name} does not run on step graphs ({self.window_graphs_only})")

    def check(self, model: ir.Model, ctx: Context) -> None:
        require_thresholds(model, self.name)


@dataclasses.dataclass
class SearchThreshold:
    node: ir.Node
    macs: int
    group: tuple          # what the search moves together
    role: tuple           # ((in, out) of each site it feeds), sorted
    compensation: compensation.Compensation = compensation.NONE   # low-rank factors it pays for

    @property
    def source(self) -> str:
        """What its level is calibrated on: its input, or its weight-aware score (calibration.statistic)."""
        return statistic(self.node)


def thresholds_by_role(model: ir.Model, bands: int = 1) -> tuple[list[SearchThreshold], list]:
    """The model's Thresholds in graph order, each grouped by (site role, depth band), and the
    naturally sparse sites."""
    sites = analyze(model.graph).sites
    nodes = [n for n in model.graph if ops.is_threshold(n)]
    fed = {n.name: [s for s in sites if s.threshold == n.name] for n in nodes}
    roles = {n.name: tuple(sorted((s.in_features, s.out_features) for s in fed[n.name])) for n in nodes}
    costs = compensation.by_threshold(sites)
    count = {r: sum(1 for n in nodes if roles[n.name] == r) for r in set(roles.values())}
    seen: dict = {}
    out = []
    for n in nodes:   # graph order: depth
        role = roles[n.name]
        index = seen[role] = seen.get(role, -1) + 1
        band = index * bands // count[role]
        out.append(SearchThreshold(n, sum(s.macs_per_token for s in fed[n.name]), (role, band), role,
                                   costs.get(n.name, compensation.NONE)))
    natural = [s for s in sites if s.natural and not s.head]
    return out, natural


def role_label(role: tuple) -> str:
    """A role as the shapes of the sites a threshold feeds, e.g. 576x1536+576x1536 (an id:
    checkpoints and reports key groups by it; `group_labels` names them for people)."""
    return "+".join(f"{k}x{n}" for k, n in role)


def group_labels(model: ir.Model, thresholds: list[SearchThreshold], key=lambda th: th.group) -> dict:
    """key(threshold) -> the label of the sites its thresholds feed, e.g. `layers 0-3 q/k/v`
    (sparsecc.site_names); `key` picks what is named: each threshold's group by default."""
    names = threshold_names(model.graph)
    members: dict = {}
    for th in thresholds:
        members.setdefault(key(th), []).extend(names.get(th.node.name, []))
    return {k: label(v) for k, v in members.items()}


def dense_statistics(model: ir.Model, thresholds: list[SearchThreshold], natural: list, ctx: Context,
                     prefix: str) -> dict[str, AbsHistogram]:
    """|x| histograms of every threshold's input with all thresholds at 0, and of the naturally
    sparse sites' inputs."""
    for th in thresholds:
        ops.set_threshold(th.node, 0.0)
    return collect(model, [th.source for th in thresholds] + [s.consumes for s in natural], ctx.calibration,
                   ctx.cache_dir, desc=f"{prefix}: statistics")


def model_sparsity(thresholds: list[SearchThreshold], natural: list, hists: dict, levels: dict) -> float:
    """Model-wide MAC-weighted sparsity with every threshold at its group's level (or its
    input's exact zeros, if more), the naturally sparse sites at theirs."""
    total = sum(th.macs for th in thresholds) + sum(s.macs_per_token for s in natural)
    zeroed = sum(th.macs * max(levels[th.group], hists[th.source].zeros) for th in thresholds)
    zeroed += sum(s.macs_per_token * hists[s.consumes].zeros for s in natural)
    zeroed -= sum(th.compensation.macs(levels[th.group], hists[th.source].zeros) for th in thresholds)
    return zeroed / total if total else 0.0


def threshold_sparsity(thresholds: list[SearchThreshold], natural: list, hists: dict, levels: dict) -> float:
    """Model-wide MAC-weighted sparsity with each threshold at the sparsity its own level (node
    name -> level) gives on its statistic (for passes that move each threshold on its own)."""
    return model_sparsity(thresholds, natural, hists,
                          {th.group: hists[th.source].sparsity_at(levels[th.node.name]) for th in thresholds})


def scaled_levels(levels: dict, moved, factor: float) -> dict:
    """`levels` with those named in `moved` times `factor`."""
    return {k: v * factor if k in moved else v for k, v in levels.items()}


def common_factor(sparsity, target: float) -> float:
    """The smallest factor f with sparsity(f) >= target (sparsity is monotone in f), by bisection."""
    low, high = 0.0, 1.0
    while sparsity(high) < target and high < 1e6:
        low, high = high, high * 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sparsity(mid) < target else (low, mid)
    return high


def visit_order(windows: int, length: int, seed: int) -> list[int]:
    """Window indices to visit: shuffled passes over all windows, from `seed`."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < length:
        order.extend(int(i) for i in rng.permutation(windows))
    return order[:length]


def settle(model: ir.Model, thresholds: list[SearchThreshold], hists: dict, levels: dict, ctx: Context,
           refine: int, prefix: str) -> None:
    """Write every threshold's t for its level, re-measuring its input `refine` times with the
    thresholds in place (as it is seen behind the upstream ones). Updates `hists`."""
    for _ in range(refine):
        apply_levels(thresholds, hists, levels)
        hists |= collect(model, [th.source for th in thresholds], ctx.calibration, ctx.cache_dir,
                         desc=f"{prefix}: refine")
    apply_levels(thresholds, hists, levels)


def apply_levels(thresholds: list[SearchThreshold], hists: dict[str, AbsHistogram], levels: dict) -> None:
    for th in thresholds:
        ops.set_threshold(th.node, hists[th.source].threshold_for(levels[th.group]))


class LossProbe:
    """The model in one ONNX Runtime session with every threshold's t as an input."""

    def __init__(self, model: ir.Model, thresholds: list[SearchThreshold], hists: dict, ctx: Context, windows: int):
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
        ts = {th.node.inputs[1].name: ops.threshold_array(th.node, self.hists[th.source].threshold_for(levels[th.group]))
              for th in self.thresholds}
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


class Checkpoint:
    """The search state after each move, in the cache, under a key of the statistics and options."""

    def __init__(self, prefix: str, cache_dir: Path | None, config, hists: dict, sources: list[str], label):
        self.path, self.label, self.prefix = None, label, prefix
        if cache_dir is not None:
            digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
            for name in sources:
                digest.update(name.encode())
                digest.update(hists[name].counts.tobytes())
            self.path = Path(cache_dir) / f"{prefix}-{digest.hexdigest()[:32]}.json"

    def load(self, groups: list, start: float) -> tuple[dict, list]:
        levels = dict.fromkeys(groups, start)
        if self.path is None or not self.path.is_file():
            return levels, []
        by_label = {self.label(g): g for g in groups}
        try:
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            history, resumed = saved["history"], {by_label[k]: v for k, v in saved["levels"].items()}  # a level, or per-channel levels
            if not isinstance(history, list):
                raise TypeError("history")
        except Exception:   # truncated, corrupt or foreign: never resumed from
            log(f"warning: {self.prefix}: checkpoint {self.path} is unreadable (corrupt or truncated); "
                "starting the search afresh")
            return levels, []
        log(f"{self.prefix}: resuming a search of {len(history)} moves from {self.path.name}")
        return levels | resumed, history

    def save(self, levels: dict, history: list) -> None:
        if self.path is None:
            return
        text = json.dumps({"levels": {self.label(g): v for g, v in levels.items()}, "history": history})
        atomic_write(self.path, lambda f: f.write(text.encode()))
