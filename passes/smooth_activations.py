"""smooth-activations: move the outliers of the events into the weights before int8
(SmoothQuant, Xiao et al. 2023). A site input x with a few large channels quantizes badly at
one scale per tensor; dividing channel j by s_j and multiplying row j of every weight that
reads x by s_j leaves the products unchanged, and with

    s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha)

the range is shared between events and weights (W_j: row j of all the sites reading x).

The division costs nothing on the chip where it folds into the op that makes x: the scale
of an RMS/LayerNorm (a Mul by a constant vector, or LayerNormalization's scale and bias), or
the up projection whose output multiplies the gate (x = act(gate) * up: its output columns).
A site input made by anything else (the attention output) is left as it is, and said so.

The thresholds keep their decisions: a Threshold on x becomes one on x / s with t / s per
channel and a score scale multiplied by s (sparsecc.ops), so |x_j / s_j| * s_j = |x_j| is
what a later search calibrates, and sparsity is unchanged. Run it after the thresholds are
set and before quantize-weights and quantize-activations.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.config import option
from sparsecc.pass_manager import Context, Pass, PassResult
from sparsecc.progress import bar
from sparsecc.runtime import load_session, saved_copy, values_by_name
from sparsecc.sites import analyze

SCALE_RANGE = (1e-4, 1e4)    # keeps float16 weights and norm scales in range


@dataclasses.dataclass(frozen=True)
class SmoothActivationsConfig:
    alpha: float = option(0.5, "migration strength: 0 leaves the events as they are, 1 moves their whole "
                               "range into the weights", within="[0, 1]")
    include_head: bool = option(False, "smooth the head's input too (its norm feeds nothing else)")


class SmoothActivations(Pass):
    """Per-channel scales moved from the events into the weights (SmoothQuant), folded into norms and up projections."""

    name = "smooth-activations"
    before = frozenset({"int8-events", "int8-weights"})
    needs_data = True
    Config = SmoothActivationsConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        analysis = analyze(model.graph)
        sites: dict[str, list[ir.Node]] = {}     # smoothed tensor (the Threshold's input, else the site's) -> sites
        thresholds: dict[str, list[ir.Node]] = {}
        for site, node in zip(analysis.sites, analysis.nodes):
            if site.head and not self.config.include_head:
                continue
            x = node.inputs[0]
            threshold = x.producer() if x.producer() is not None and ops.is_threshold(x.producer()) else None
            tensor = threshold.inputs[0] if threshold is not None else x
            sites.setdefault(tensor.name, []).append(node)
            if threshold is not None and threshold not in thresholds.setdefault(tensor.name, []):
                thresholds[tensor.name].append(threshold)
        values = values_by_name(model.graph)
        plans, rows = {}, []
        for name, nodes in sites.items():
            fold, reason = _fold_target(values[name], nodes + thresholds.get(name, []), analysis.nodes)
            if fold is None:
                rows.append({"tensor": name, "sites": [n.name for n in nodes], "smoothed": False, "reason": reason})
            else:
                plans[name] = fold
        if not plans:
            return PassResult({"alpha": self.config.alpha, "tensors": 0, "activations": rows}, changed=False)
        peaks = channel_absmax(model, sorted(plans), ctx.calibration)
        for name, (kind, target) in plans.items():
            nodes = sites[name]
            weight_peak = np.max([np.abs(_rows(n)).max(axis=1) for n in nodes], axis=0)
            s = _scales(peaks[name], weight_peak, self.config.alpha)
            _divide(kind, target, s)
            for node in nodes:
                _scale_rows(node, s)
            for threshold in thresholds.get(name, []):
                ops.rescale_channels(threshold, s)
            rows.append({"tensor": name, "sites": [n.name for n in nodes], "smoothed": True, "folded_into": kind,
                         "event_peak_before": _round(peaks[name].max()),
                         "event_peak_after": _round((peaks[name] / s).max()),
                         "scale_min": _round(s.min()), "scale_max": _round(s.max())})
        return PassResult({"alpha": self.config.alpha, "tensors": len(plans), "activations": rows})


def channel_absmax(model: ir.Model, tensors: list[str], source) -> dict[str, np.ndarray]:
    """max |x| per channel (the last axis) of each tensor over every feed of `source`."""
    peaks: dict[str, np.ndarray] = {}
    with saved_copy(model, tensors) as files:
        session = load_session(files[0])
        inputs = [i.name for i in session.get_inputs()]
        for feed in bar(source.feeds(inputs), total=len(source), desc="measuring channel peaks"):
            for name, x in zip(tensors, session.run(tensors, feed)):
                peak = np.abs(np.asarray(x, np.float32)).reshape(-1, x.shape[-1]).max(axis=0)
                peaks[name] = peak if name not in peaks else np.maximum(peaks[name], peak)
    return peaks


def _scales(x_peak: np.ndarray, w_peak: np.ndarray, alpha: float) -> np.ndarray:
    """s_j, 1 where a channel is all zero (in the data or in the weights)."""
    x_peak, w_peak = x_peak.astype(np.float64), w_peak.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where((x_peak > 0) & (w_peak > 0), x_peak ** alpha / w_peak ** (1 - alpha), 1.0)
    return np.clip(s, *SCALE_RANGE).astype(np.float32)


def _fold_target(x: ir.Value, readers: list[ir.Node], sites: list[ir.Node]):
    """(how x / s is folded, into what) or (None, why not). x must feed only `readers` (its
    sites and Thresholds), so changing it changes nothing else."""
    if any(use.node not in readers for use in x.uses()) or x.is_graph_output():
        return None, "it feeds other ops too"
    if not all(_private_const(n.inputs[1], n) for n in readers if not ops.is_threshold(n)):
        return None, "a site's weight is shared or not a plain initializer"
    node = x.producer()
    if node is None:
        return None, "it is a graph input"
    if node.op_type == "LayerNormalization" and node.domain == "":
        params = [v for v in node.inputs[1:3] if v is not None]
        if all(_private_const(v, node) for v in params):
            return ("layer-norm", node), None
        return None, "its norm's scale or bias is shared or not a constant"
    if node.op_type == "Mul" and node.domain == "":
        a, b = node.inputs
        for vector, other in ((a, b), (b, a)):
            if vector.const_value is not None and _private_const(vector, node) and \
                    vector.const_value.numpy().ndim == 1:
                return ("norm-scale", vector), None
        for up, other in ((a, b), (b, a)):   # act(gate) * up: up's output columns
            producer = up.producer()
            if producer in sites and len(up.uses()) == 1 and not up.is_graph_output() and \
                    _private_const(producer.inputs[1], producer):
                return ("up-projection", producer), None
    return None, f"made by {node.op_type}, which has no per-channel scale to fold into"


def _private_const(value: ir.Value | None, user: ir.Node) -> bool:
    return value is not None and value.const_value is not None and all(u.node is user for u in value.uses())


def _divide(kind: str, target, s: np.ndarray) -> None:
    if kind == "norm-scale":
        _set(target, target.const_value.numpy() / s)
    elif kind == "layer-norm":
        for value in target.inputs[1:3]:
            if value is not None:
                _set(value, value.const_value.numpy() / s)
    else:   # the up projection: its output channels are its weight's columns
        w = target.inputs[1]
        transposed = target.op_type == "Gemm" and _attribute(target, "transB")
        _set(w, w.const_value.numpy() / (s[:, None] if transposed else s))
        bias = target.inputs[2] if target.op_type == "Gemm" and len(target.inputs) > 2 else None
        if bias is not None and bias.const_value is not None:
            _set(bias, bias.const_value.numpy() / s)


def _rows(node: ir.Node) -> np.ndarray:
    """A site's weight as [input channels, outputs]."""
    w = node.inputs[1].const_value.numpy()
    return w.T if node.op_type == "Gemm" and _attribute(node, "transB") else w


def _scale_rows(node: ir.Node, s: np.ndarray) -> None:
    w = node.inputs[1]
    transposed = node.op_type == "Gemm" and _attribute(node, "transB")
    _set(w, w.const_value.numpy() * (s if transposed else s[:, None]))


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(array, value.const_value.numpy().dtype), name=value.name)


def _attribute(node: ir.Node, name: str) -> bool:
    attribute = node.attributes.get(name)
    return attribute is not None and bool(attribute.value)


def _round(x) -> float:
    return float(f"{float(x):.6g}")
