"""sparsecc's own operators, in their own versioned domain.

Each is a model-local ONNX function whose body uses standard ops only, so ONNX Runtime runs
a compiled model with no custom kernel, while backends match the op itself, not its body.

    Threshold(x, t) = x where |x| > t, else 0        (domain ai.sparsecc, version 1)

`t` is a scalar of x's type, or a vector over x's last axis (one t per input channel: a
weight-aware threshold, below); t = 0 keeps x unchanged (exact zeros stay zero).

A weight-aware threshold (WINA, `weight-scores` pass) keeps x_i where the score
|x_i| * c_i > tau, c_i a per-channel weight recorded on the node (`set_score_scale`). That is
the per-channel threshold t_i = tau / c_i, so the op and every backend stay as they are; the
level tau is what the threshold passes set (`set_threshold`), the vector t is what runs. c is
kept in the node's metadata (exact float32, base64), not as an initializer: nothing in the
graph reads it, and unused initializers are dropped by passes and by ONNX Runtime.
"""
from __future__ import annotations

import base64
import functools

import numpy as np
import onnx_ir as ir

DOMAIN = "ai.sparsecc"
VERSION = 1
THRESHOLD = "Threshold"


def is_threshold(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == THRESHOLD


def threshold_function(opset: int) -> ir.Function:
    """The body of Threshold, written against the model's default-domain opset."""
    x, t = ir.Value(name="x"), ir.Value(name="t")
    magnitude = ir.node("Abs", [x])
    keep = ir.node("Greater", [magnitude.outputs[0], t])
    zero = ir.node("Constant", [], attributes={"value": ir.tensor(0.0, dtype=ir.DataType.FLOAT)})
    zero_like = ir.node("CastLike", [zero.outputs[0], x])
    select = ir.node("Where", [keep.outputs[0], x, zero_like.outputs[0]])
    select.outputs[0].name = "y"
    graph = ir.Graph([x, t], [select.outputs[0]], nodes=[magnitude, keep, zero, zero_like, select],
                     opset_imports={"": opset}, name=THRESHOLD)
    return ir.Function(DOMAIN, THRESHOLD, graph=graph, attributes=[])


def ensure_threshold_function(model: ir.Model) -> None:
    """Register the function and its domain on `model` (idempotent)."""
    key = (DOMAIN, THRESHOLD, "")
    if key not in model.functions:
        model.functions[key] = threshold_function(model.opset_imports.get("", 18))
    model.opset_imports[DOMAIN] = VERSION
    model.graph.opset_imports[DOMAIN] = VERSION


def set_threshold(node: ir.Node, t: float) -> None:
    """Set a Threshold node's level: t itself (a scalar of its declared type), or for a
    weight-aware threshold the score threshold tau, written as the vector tau / c."""
    _write(node, threshold_array(node, t))


def threshold_array(node: ir.Node, level: float) -> np.ndarray:
    """The t that `level` means for `node`: the scalar level, or tau / c per channel (a channel
    whose c is 0 feeds nothing: t = inf drops it for any tau > 0; tau = 0 is the identity)."""
    dtype = node.inputs[1].dtype.numpy() if node.inputs[1].dtype is not None else np.float32
    scale = score_scale(node)
    if scale is None:
        return np.array(level, dtype)
    if float(level) == 0.0:
        return np.zeros(scale.shape, dtype)
    with np.errstate(divide="ignore", over="ignore"):
        return (np.float64(level) / scale.astype(np.float64)).astype(dtype)


def raise_threshold(node: ir.Node, floor) -> None:
    """Raise t to at least `floor` (per channel for a vector t)."""
    t = node.inputs[1].const_value.numpy()
    _write(node, np.maximum(t, np.asarray(floor, t.dtype)))


def rescale_channels(node: ir.Node, s: np.ndarray) -> None:
    """Make `node` take the same decisions on x / s (s per channel of x's last axis) as it
    took on x: t / s per channel, and a score scale multiplied by s, so the level (tau) and
    what a search calibrates, |x_i / s_i| * s_i * c_i, stay as they were."""
    s = np.asarray(s, np.float32)
    t = node.inputs[1].const_value.numpy()
    scale = score_scale(node)
    set_score_scale(node, (scale if scale is not None else np.ones_like(s)) * s)   # resets t: written next
    _write(node, (np.broadcast_to(t, s.shape).astype(np.float64) / s).astype(t.dtype))


def threshold_level(node: ir.Node) -> float:
    """The level a Threshold is at: t, or for a weight-aware threshold tau = t_i x c_i at the
    channel of largest c (float32, as t is stored)."""
    t = node.inputs[1].const_value.numpy()
    scale = score_scale(node)
    if scale is None or t.ndim == 0:
        return float(t)
    i = int(np.argmax(scale))
    return float(np.float32(np.float64(t[i]) * scale[i])) if scale[i] > 0 else 0.0


SCORE_SCALE = "sparsecc.score_scale"    # node metadata: the per-channel c of a weight-aware threshold


def score_scale(node: ir.Node) -> np.ndarray | None:
    """c of a weight-aware threshold (float32, read-only), None for a magnitude threshold."""
    text = node.metadata_props.get(SCORE_SCALE)
    return None if text is None else _decode(text)


def set_score_scale(node: ir.Node, scale: np.ndarray) -> None:
    """Make `node` threshold the score |x_i| * scale_i (scale over x's last axis); t is reset to
    the identity (tau = 0) as a vector, for set_threshold to fill."""
    scale = np.asarray(scale, np.float32)
    if scale.ndim != 1 or not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError("a score scale is a 1-D vector of finite, non-negative weights")
    node.metadata_props[SCORE_SCALE] = base64.b64encode(scale.astype("<f4").tobytes()).decode("ascii")
    set_threshold(node, 0.0)


@functools.lru_cache(maxsize=4096)
def _decode(text: str) -> np.ndarray:
    scale = np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32)
    scale.flags.writeable = False
    return scale


def _write(node: ir.Node, t: np.ndarray) -> None:
    node.inputs[1].const_value = ir.tensor(t, name=node.inputs[1].name)
    node.inputs[1].shape = ir.Shape(t.shape)   # read when t becomes a graph input (threshold searches)


def make_threshold(x: ir.Value, t: ir.Value, name: str) -> ir.Node:
    node = ir.Node(DOMAIN, THRESHOLD, [x, t], name=name, version=VERSION)
    node.outputs[0].name = f"{name}.out"
    dtype = x.dtype or t.dtype  # t has x's type; x's may be undeclared (no value_info)
    if dtype is not None:
        node.outputs[0].dtype = dtype
    node.outputs[0].shape = x.shape
    return node
