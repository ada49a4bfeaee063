"""weight-scores: weight-aware thresholds (WINA). A channel is kept on its score
|x_i| * c_i instead of |x_i|, where c_i is the L2 norm of the weight row that input channel i
multiplies: a small activation feeding large weights can matter more than a larger one
feeding small weights.

For a threshold shared by several sites (q/k/v, gate/up) c_i is the L2 norm over all their
rows for channel i, sqrt(sum over the sites of |W_s[i, :]|^2): the norm of channel i's
contribution to the sites' outputs taken together, so each site weighs by its own width.
With `per_consumer` thresholds each site has its own c.

Thresholding the score at tau is the per-channel threshold t_i = tau / c_i, so the pass
records c on each Threshold (sparsecc.ops.set_score_scale) and leaves the op as it is. Every
threshold method then works on scores without knowing it: it calibrates on histograms of the
score (sparsecc.calibration.statistic) and sets tau (sparsecc.ops.set_threshold), which
writes the vector t. Place it after insert-thresholds and before the pass that sets the
thresholds (calibrate-thresholds, allocate-sparsity, sequential-search, ...).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, Pass, PassResult, require
from sparsecc.sites import analyze, weight_array


@dataclasses.dataclass(frozen=True)
class WeightScoresConfig:
    exponent: float = option(1.0, "score = |x_i| * c_i ** exponent, c_i the L2 norm of the weight rows input "
                                  "channel i multiplies; 1: WINA, values towards 0 lean towards plain |x|")

    def __post_init__(self):
        if not (math.isfinite(self.exponent) and self.exponent > 0):
            raise SparseccError(f"exponent must be a positive number (got {self.exponent}); 1 is WINA, and an "
                                "exponent of 0 is plain magnitude: leave weight-scores out for that")


class WeightScores(Pass):
    """Weight-aware thresholds (WINA): keep a channel on |x_i| x the L2 norm of the weights it multiplies."""

    name = "weight-scores"
    needs = frozenset({"thresholds"})
    before = frozenset({"levels"})
    Config = WeightScoresConfig

    def check(self, model, ctx):
        nodes = [n for n in model.graph if ops.is_threshold(n)]
        require(bool(nodes), "weight-scores found no Threshold ops: run insert-thresholds before it")
        set_already = next((n.name for n in nodes if np.any(n.inputs[1].const_value.numpy() != 0)), None)
        require(set_already is None, f"Threshold {set_already!r} is already set: weight-scores changes what a level "
                                     "means, so run it right after insert-thresholds, before the pass that sets them")

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        analysis = analyze(model.graph)
        fed: dict[str, list[tuple[str, ir.Node]]] = {}
        for site, node in zip(analysis.sites, analysis.nodes):
            if site.threshold is not None:
                fed.setdefault(site.threshold, []).append((site.node, node))
        rows = []
        for threshold in [n for n in model.graph if ops.is_threshold(n)]:
            if threshold.name not in fed:
                raise SparseccError(f"Threshold {threshold.name!r} feeds no linear site, so its channels have no "
                                    "weights to score; remove it or insert thresholds with insert-thresholds")
            squares = sum(np.square(_rows(node)).sum(axis=1) for _, node in fed[threshold.name])
            width = threshold.inputs[0].shape[-1] if threshold.inputs[0].shape else None
            if isinstance(width, int) and width != squares.size:
                raise SparseccError(f"Threshold {threshold.name!r} reads {width} channels but its sites' weights have "
                                    f"{squares.size} rows; weight-scores needs the channels on the input's last axis")
            norms = np.sqrt(squares)
            ops.set_score_scale(threshold, norms ** self.config.exponent)
            rows.append({"threshold": threshold.name, "sites": [name for name, _ in fed[threshold.name]],
                         "channels": int(norms.size), "norm_min": _round(norms.min()), "norm_max": _round(norms.max()),
                         "zero_rows": int(np.count_nonzero(norms == 0))})
        return PassResult({"exponent": self.config.exponent, "thresholds": rows})


def _rows(node: ir.Node) -> np.ndarray:
    """A site's weight as [input channels, outputs] (float64)."""
    attribute = node.attributes.get
    if node.op_type == "Gemm" and attribute("transA") is not None and attribute("transA").value:
        raise SparseccError(f"Gemm {node.name!r} has transA=1: its input channels are not on the input's last "
                            "axis, which a per-channel threshold needs; export it without transA")
    w = weight_array(node.inputs[1]).astype(np.float64)
    if node.op_type == "Gemm" and attribute("transB") is not None and attribute("transB").value:
        w = w.T
    return w


def _round(x) -> float:
    return float(f"{float(x):.6g}")
