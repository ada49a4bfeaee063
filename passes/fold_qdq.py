"""fold-qdq: bring the QuantizeLinear/DequantizeLinear pairs of an already-quantized (QDQ)
model into the form sparsecc's sites take: integer weights plus scales on each site.

QDQ models come from ONNX Runtime's `quantize_static` or PyTorch's export of a quantized
model. A site's weight may arrive as DequantizeLinear(int8 constant) (kept: that is the
folded form) or as DequantizeLinear(QuantizeLinear(float constant)), where the constant may
reach the quantizer through layout ops (a Transpose): the quantizer is evaluated here, once,
into an int8 initializer. Until then the weight does not count as constant and the MatMul
is not a site. Activation pairs stay where they are: ONNX Runtime runs them, and the seneca
backend runs a site whose weights and activations are both symmetric int8 on its INT8
lanes. The report says, per site, whether it is such an integer site and, if not, why
(asymmetric zero points, 16-bit types, ...), so nothing is silently run in float.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sparsecc.model_io import add_initializer, remove_unused
from sparsecc.pass_manager import Context, Pass, PassResult
from sparsecc.sites import analyze, const_root, int8_operands, integer_type, quantizer_of, weight_array


class FoldQdq(Pass):
    """Fold QDQ-quantized weights into int8 initializers plus scales; report which sites are integer."""

    name = "fold-qdq"

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        graph = model.graph
        folded = sum(_fold_weight(graph, node) for node in list(graph)
                     if node.op_type in ("MatMul", "Gemm") and node.domain == "")
        remove_unused(graph)
        analysis = analyze(graph)
        integer, declined = [], []
        for site, node in zip(analysis.sites, analysis.nodes):
            if int8_operands(node) is not None:
                integer.append(site.node)
            elif _is_quantized(node):
                declined.append({"site": site.node, "reason": _why_not_integer(node)})
        return PassResult({"weights_folded": folded, "integer_sites": len(integer),
                "float_sites": len(analysis.sites) - len(integer), "declined": declined}, changed=folded > 0)


def _fold_weight(graph: ir.Graph, node: ir.Node) -> int:
    """DequantizeLinear(QuantizeLinear(constant)) on the weight -> DequantizeLinear(int8 constant)."""
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return 0
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or q.domain != "" or const_root(q.inputs[0]) is None:
        return 0
    x = weight_array(q.inputs[0]).astype(np.float32)
    scale = weight_array(q.inputs[1]).astype(np.float32)
    zero = weight_array(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else np.zeros((), np.uint8)
    axis = q.attributes["axis"].value if q.attributes.get("axis") is not None else 1
    if scale.ndim == 1 and x.ndim > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.ndim else zero
    info = np.iinfo(zero.dtype)
    integers = np.clip(np.rint(x / scale) + zero.astype(np.int64), info.min, info.max).astype(zero.dtype)
    value = add_initializer(graph, f"{q.name or q.outputs[0].name}.folded", integers)
    dq.replace_input_with(0, value)
    return 1


def _is_quantized(node: ir.Node) -> bool:
    dq = node.inputs[1].producer()
    return quantizer_of(node.inputs[0]) is not None or (dq is not None and dq.op_type == "DequantizeLinear")


def _why_not_integer(node: ir.Node) -> str:
    for label, value in (("weights", node.inputs[1]), ("activations", node.inputs[0])):
        dq = value.producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            return f"{label} are not quantized"
        kind = integer_type(dq.inputs[0])
        if kind != ir.DataType.INT8:
            return f"{label} are {kind.name.lower() if kind is not None else 'of unknown type'}, not int8"
        if len(dq.inputs) > 2 and dq.inputs[2] is not None:
            zero = dq.inputs[2].const_value
            if zero is None or np.any(zero.numpy() != 0):
                return f"{label} have a non-zero zero point (asymmetric)"
    return "scales are not one per output neuron (weights) and one per tensor (activations)"
