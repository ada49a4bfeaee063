"""sparsecc's own operators, in their own versioned domain.

Each is a model-local ONNX function whose body uses standard ops only, so ONNX Runtime runs
a compiled model with no custom kernel, while backends match the op itself, not its body.

    Threshold(x, t) = x where |x| > t, else 0        (domain ai.sparsecc, version 1)

`t` is a scalar of x's type; t = 0 keeps x unchanged (exact zeros stay zero).
"""
from __future__ import annotations

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
    """Set a Threshold node's t (a scalar of its declared type)."""
    dtype = node.inputs[1].dtype.numpy() if node.inputs[1].dtype is not None else np.float32
    node.inputs[1].const_value = ir.tensor(np.array(t, dtype), name=node.inputs[1].name)


def make_threshold(x: ir.Value, t: ir.Value, name: str) -> ir.Node:
    node = ir.Node(DOMAIN, THRESHOLD, [x, t], name=name, version=VERSION)
    node.outputs[0].name = f"{name}.out"
    dtype = x.dtype or t.dtype  # t has x's type; x's may be undeclared (no value_info)
    if dtype is not None:
        node.outputs[0].dtype = dtype
    node.outputs[0].shape = x.shape
    return node
