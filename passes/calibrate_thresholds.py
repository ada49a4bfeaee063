"""calibrate-thresholds: set every Threshold's t from calibration data to meet a sparsity target."""
from __future__ import annotations

import dataclasses

import onnx_ir as ir

from sparsecc import compensation, ops
from sparsecc.calibration import AbsHistogram, Collector, shifted, statistic
from sparsecc.flag_configs import CalibrateThresholdsConfig
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassResult
from sparsecc.site_names import site_labels, threshold_labels
from sparsecc.sites import Site, analyze
from sparsecc.threshold_search import ThresholdSearch


@dataclasses.dataclass
class _Threshold:
    node: ir.Node
    sites: list[Site]
    compensation: compensation.Compensation = compensation.NONE   # low-rank factors it pays for

    @property
    def source(self) -> str:
        """What its level is calibrated on: its input, or its weight-aware score (calibration.statistic)."""
        return statistic(self.node)

    @property
    def macs(self) -> int:
        return sum(s.macs_per_token for s in self.sites)


class CalibrateThresholds(ThresholdSearch):
    """Set thresholds from streamed |x| histograms for a uniform or MAC-weighted sparsity target."""

    name = "calibrate-thresholds"
    Config = CalibrateThresholdsConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        sites = analyze(model.graph).sites
        costs = compensation.by_threshold(sites)
        thresholds = [_Threshold(n, [s for s in sites if s.threshold == n.name], costs.get(n.name, compensation.NONE))
                      for n in model.graph if ops.is_threshold(n)]
        natural = [s for s in sites if s.natural and not s.head]
        tensors = [th.source for th in thresholds] + [s.consumes for s in natural]
        rounds, every = 1 + self.config.refine, self.config.refine_every if self.config.refine else 1
        with Collector(model, tensors, ctx.calibration, ctx.cache_dir) as collector:
            for round_ in range(rounds):
                desc = f"calibrating ({round_ + 1}/{rounds})"
                if every == 1:
                    hists = collector.measure(desc)[0]
                elif round_ == 0:   # the dense pass, and its share that the refine rounds revisit
                    hists, base = collector.measure(desc, every=(1, every))
                    dense = hists
                else:
                    now = collector.measure(desc, every=(every,))[0]
                    hists = {name: shifted(dense[name], base[name], now[name]) for name in tensors}
                level = self._level(thresholds, natural, hists)
                for th in thresholds:
                    t = hists[th.source].threshold_for(level)
                    ops.set_threshold(th.node, t)
        return self._report(model, thresholds, natural, hists, level)

    def _level(self, thresholds: list[_Threshold], natural: list[Site], hists: dict[str, AbsHistogram]) -> float:
        """The common per-threshold sparsity level that meets the target."""
        target = self.config.sparsity
        if self.config.mode == "uniform":
            return target

        zeros = {name: hists[name].zeros for name in {th.source for th in thresholds} | {s.consumes for s in natural}}

        def model_wide(level: float) -> float:
            effective = sum(th.macs * max(level, zeros[th.source]) for th in thresholds)
            effective += sum(s.macs_per_token * zeros[s.consumes] for s in natural)
            effective -= sum(th.compensation.macs(level, zeros[th.source]) for th in thresholds)
            return effective / (sum(th.macs for th in thresholds) + sum(s.macs_per_token for s in natural))

        lo, hi = 0.0, 1.0
        if model_wide(lo) >= target:
            return 0.0
        if model_wide(hi) < target:
            raise SparseccError(f"sparsity target {target:.1%} is out of reach: with every threshold at 100% the "
                                f"model-wide figure is {model_wide(hi):.1%} (natural sites and low-rank compensation "
                                "count); lower the target or the compensation rank")
        for _ in range(60):  # bisection: model_wide is monotone in the level
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if model_wide(mid) < target else (lo, mid)
        return hi

    def _report(self, model, thresholds, natural, hists, level) -> PassResult:
        analysis = analyze(model.graph)
        labels, site_label = threshold_labels(model.graph, analysis), site_labels(model.graph, analysis)
        rows, eff, dense = [], 0.0, 0
        for th in thresholds:
            t = ops.threshold_level(th.node)
            sparsity = hists[th.source].sparsity_at(t)
            eff += th.macs * (1 - sparsity) + th.compensation.macs(sparsity, hists[th.source].zeros)
            dense += th.macs
            rows.append({"threshold": th.node.name, "label": labels[th.node.name], "tensor": th.node.inputs[0].name, "sites": [s.node for s in th.sites],
                         "t": t, "calibrated_sparsity": round(sparsity, 6)}
                        | ({"score": "weight-aware (t = tau / c per channel)"} if ops.score_scale(th.node) is not None else {}))
        for s in natural:
            eff += s.macs_per_token * (1 - hists[s.consumes].zeros)
            dense += s.macs_per_token
        return PassResult({
            "target": self.config.sparsity, "mode": self.config.mode, "level": round(level, 6),
            "calibrated_model_sparsity": round(1 - eff / dense, 6) if dense else 0.0,
            "natural": [{"site": s.node, "label": site_label[s.index], "sparsity": round(hists[s.consumes].zeros, 6)}
                        for s in natural],
            "thresholds": rows,
        })
