"""quantize-activations: int8 events. Every linear site's input gets a symmetric int8
QuantizeLinear -> DequantizeLinear pair (one scale per tensor, zero point 0), calibrated on
the same streaming |x| histograms as the thresholds.

The scale clips at the value C that minimises the expected squared error over the histogram
(values above C clip to C, values at or below it round to multiples of s = C / 127). The
threshold and the quantizer's zero band are one decision: a value with |x| <= s / 2 rounds
to zero, so a site's Threshold is raised to max(t, s / 2) and the Threshold alone decides
which channels send an event; the report gives the sparsity this adds. A tensor whose
expected int8 error is above `max_error` of its power (outlier channels, as in the inputs of
some MLP down projections) keeps 16-bit events: mixed precision, chosen per tensor. With int8 weights
(quantize-weights, bits 8) the seneca backend runs such sites on its packed INT8 lanes.
ONNX Runtime runs the pairs as written, so accuracy stays measurable.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.calibration import EDGES, AbsHistogram, collect
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.model_io import add_initializer, earliest
from sparsecc.pass_manager import Context, Pass, PassResult
from sparsecc.sites import analyze

QMAX = 127


@dataclasses.dataclass(frozen=True)
class QuantizeActivationsConfig:
    bits: int = option(8, "bits per event value: 8 (16-bit events need no pass: they are the target's float16)")
    clip: Literal["mse", "max"] = option("mse", "mse: the clip value with the least squared error; max: the largest |x| seen")
    include_head: bool = option(True, "quantize the head's input too")
    max_error: float = option(0.001, "a tensor whose int8 error would exceed this share of its power "
                                     "(error / sum x^2, from the histogram) keeps 16-bit events; 1: every tensor int8",
                                 within="(0, inf)")

    def __post_init__(self):
        if self.bits != 8:
            raise SparseccError(f"activations quantize to 8 bits (got {self.bits}); 16-bit events are the "
                                "target's float16 values and need no pass")


def _squared_error(centres: np.ndarray, counts: np.ndarray, clip: float) -> float:
    """Expected total squared error of int8 quantization clipped at `clip`."""
    s = clip / QMAX
    err = np.where(centres <= clip, np.where(centres <= s / 2, centres ** 2, s * s / 12), (centres - clip) ** 2)
    return float(np.dot(counts, err))


def clip_value(hist: AbsHistogram, method: str = "mse") -> tuple[float, float]:
    """(the |x| at which to clip, the relative squared error it leaves: error / sum x^2),
    from a histogram of |x| (bin centres stand for their values)."""
    counts = hist.counts[1:].astype(np.float64)         # bin 0: exact zeros, no error
    if counts.sum() == 0:
        return 0.0, 0.0
    centres = (EDGES[1:-1] + EDGES[2:]) / 2
    used = np.flatnonzero(counts)
    counts, centres = counts[used], centres[used]
    if method == "max":
        best = float(EDGES[used[-1] + 2])              # upper edge of the highest bin in use
    else:
        candidates = np.unique(np.concatenate([centres[-200:], np.geomspace(centres[0], centres[-1], 200)]))
        best = float(min(candidates, key=lambda c: _squared_error(centres, counts, c)))
    return best, _squared_error(centres, counts, best) / float(np.dot(counts, centres ** 2))


class QuantizeActivations(Pass):
    """Symmetric int8 quantization of every linear site's input; thresholds raised to the zero band."""

    name = "quantize-activations"
    provides = frozenset({"int8-events"})
    needs_data = True
    Config = QuantizeActivationsConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        graph = model.graph
        analysis = analyze(graph)
        groups: dict[str, list[ir.Node]] = {}   # tensor a site reads -> the site nodes reading it
        for site, node in zip(analysis.sites, analysis.nodes):
            if (not site.head or self.config.include_head) and not _quantized(node.inputs[0]):
                groups.setdefault(site.consumes, []).append(node)
        if not groups:
            return PassResult({"tensors": 0}, changed=False)
        hists = collect(model, sorted(groups), ctx.calibration, ctx.cache_dir, desc="calibrating activations")
        rows = []
        for tensor, sites in groups.items():
            value = sites[0].inputs[0]
            clip, error = clip_value(hists[tensor], self.config.clip)
            if error > self.config.max_error:   # outliers int8 cannot carry: this tensor stays 16-bit
                rows.append({"tensor": tensor, "sites": [n.name for n in sites], "relative_error": round(error, 6),
                             "kept_16_bit": True})
                continue
            scale = np.float32(clip / QMAX) if clip > 0 else np.float32(1.0)
            threshold = value.producer() if value.producer() is not None and ops.is_threshold(value.producer()) else None
            raised = None
            if threshold is not None:
                t = threshold.inputs[1].const_value.numpy()
                if np.any(scale / 2 > t):   # values below s/2 round to zero: let the threshold say so (per channel)
                    raised = (scale / 2).astype(t.dtype)
                    ops.raise_threshold(threshold, raised)
            dequantized = _insert_pair(graph, value, scale, sites, f"{threshold.name if threshold else tensor}.q8")
            for node in sites:
                node.replace_input_with(0, dequantized)
            hist = hists[tensor]
            rows.append({"tensor": tensor, "sites": [n.name for n in sites], "clip": clip, "scale": float(scale),
                         "relative_error": round(error, 6),
                         "threshold_raised_to": None if raised is None else float(raised),
                         "zero_band_sparsity": round(hist.sparsity_at(float(scale) / 2), 6)})
        quantized = [r for r in rows if not r.get("kept_16_bit")]
        return PassResult({"tensors": len(quantized), "kept_16_bit": len(rows) - len(quantized),
                "bits": self.config.bits, "thresholds_raised": sum(r["threshold_raised_to"] is not None for r in quantized),
                "activations": rows}, changed=bool(quantized))


def _quantized(value: ir.Value) -> bool:
    node = value.producer()
    return node is not None and node.op_type == "DequantizeLinear" and node.domain == ""


def _insert_pair(graph: ir.Graph, value: ir.Value, scale: np.float32, sites: list[ir.Node], name: str) -> ir.Value:
    s = add_initializer(graph, f"{name}.scale", np.array(scale, (value.dtype or ir.DataType.FLOAT).numpy()))
    zero = add_initializer(graph, f"{name}.zero_point", np.array(0, np.int8))
    quantize = ir.node("QuantizeLinear", [value, s, zero], name=f"{name}.quantize")
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], s, zero], name=f"{name}.dequantize")
    quantize.outputs[0].name, dequantize.outputs[0].name = f"{name}.int8", f"{name}.out"
    quantize.outputs[0].dtype, quantize.outputs[0].shape = ir.DataType.INT8, value.shape
    dequantize.outputs[0].dtype, dequantize.outputs[0].shape = value.dtype or ir.DataType.FLOAT, value.shape
    graph.insert_before(earliest(graph, sites), [quantize, dequantize])
    return dequantize.outputs[0]
