"""quantize-weights: store every linear site's weight as symmetric integers plus scales.

The float weight operand of each site is replaced by standard ops that dequantize an int8
initializer, so ONNX Runtime still runs the model and accuracy stays measurable:
- per output channel: DequantizeLinear(q [K, N] int8, scale [N], axis=1);
- with `group`: Cast(q [K/g, g, N]) * scale [K/g, 1, N], reshaped to [K, N] (DequantizeLinear
  takes blocks only from opset 21).
4-bit values live in int8 initializers. Site discovery sees through both forms. A table that
holds a site's weight transposed (an embedding tied to the LM head) looks its rows up in the
same dequantized integers, so the weight is still stored once.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from sparsecc.config import option
from sparsecc.model_io import add_initializer, earliest, remove_unused
from sparsecc.pass_manager import Context, Pass, PassResult
from sparsecc.quant import dequantize, quantize
from sparsecc.sites import analyze, const_root, weight_array


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsConfig:
    bits: Literal[8, 4] = option(8, "bits per weight: 8, or 4 (best with `group`)")
    group: int = option(0, "input channels sharing a scale (a divisor of the input channels); 0: one scale "
                           "per output channel", within="[0, inf)")
    include_head: bool = option(True, "quantize the head (LM head, classifier) too")


class QuantizeWeights(Pass):
    """Quantize linear-site weights to symmetric int8/int4 with per-channel or grouped scales."""

    name = "quantize-weights"
    provides = frozenset({"int8-weights"})
    Config = QuantizeWeightsConfig

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        c, graph = self.config, model.graph
        analysis = analyze(graph)
        done, before, after, worst, tied = 0, 0, 0, 0.0, 0
        for site, node in zip(analysis.sites, analysis.nodes):
            if site.head and not c.include_head:
                continue
            w = weight_array(node.inputs[1]).astype(np.float32)
            transposed = w.shape != (site.in_features, site.out_features)  # Gemm transB: [N, K]
            w = w.T if transposed else w
            q, scale = quantize(w, c.bits, c.group)
            worst = max(worst, float(np.abs(dequantize(q, scale) - w).max()))
            # a table that holds this weight transposed (a tied embedding) reads the same integers
            tables = [g for g in graph if _looks_up(g, const_root(node.inputs[1]), (w.shape[1], w.shape[0]))]
            value = self._dequantized(graph, earliest(graph, [node, *tables]), q, scale, f"{site.weight}.q{c.bits}.{done}")
            for table in tables:
                rows = ir.node("Transpose", [value], attributes={"perm": [1, 0]}, name=f"{value.name}.rows.{table.name}")
                rows.outputs[0].name = f"{value.name}.rows.{table.name}"
                rows.outputs[0].dtype, rows.outputs[0].shape = value.dtype, ir.Shape([w.shape[1], w.shape[0]])
                graph.insert_before(table, rows)
                table.replace_input_with(0, rows.outputs[0])
                tied += 1
            if transposed:
                flip = ir.node("Transpose", [value], attributes={"perm": [1, 0]}, name=f"{value.name}.T")
                flip.outputs[0].name = f"{value.name}.T"
                graph.insert_before(node, flip)
                value = flip.outputs[0]
            node.replace_input_with(1, value)
            before += w.size * 4
            after += q.size * c.bits // 8 + scale.size * 4
            done += 1
        remove_unused(graph)
        return PassResult({"sites": done, "bits": c.bits, "group": c.group, "tied_tables": tied,
                "weight_bytes_float32": before, "weight_bytes_quantized": after, "max_abs_error": worst}, changed=done > 0)

    def _dequantized(self, graph: ir.Graph, before: ir.Node, q: np.ndarray, scale: np.ndarray, name: str) -> ir.Value:
        k, n = q.shape
        if scale.shape[0] == 1:
            q_value = add_initializer(graph, f"{name}.weight", q)
            s_value = add_initializer(graph, f"{name}.scale", scale[0])
            nodes = [ir.node("DequantizeLinear", [q_value, s_value], attributes={"axis": 1}, name=name)]
        else:
            groups = scale.shape[0]
            q_value = add_initializer(graph, f"{name}.weight", q.reshape(groups, k // groups, n))
            s_value = add_initializer(graph, f"{name}.scale", scale.reshape(groups, 1, n))
            shape = add_initializer(graph, f"{name}.shape", np.array([k, n], np.int64))
            cast = ir.node("Cast", [q_value], attributes={"to": ir.DataType.FLOAT}, name=f"{name}.cast")
            mul = ir.node("Mul", [cast.outputs[0], s_value], name=f"{name}.mul")
            nodes = [cast, mul, ir.node("Reshape", [mul.outputs[0], shape], name=name)]
        for i, made in enumerate(nodes):
            made.outputs[0].name = f"{name}.out{i}"
        graph.insert_before(before, nodes)
        out = nodes[-1].outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape([k, n])
        return out


def _looks_up(node: ir.Node, root: ir.Value | None, shape: tuple[int, int]) -> bool:
    """Is `node` a row look-up (Gather, axis 0) in a `shape` table computed from constant `root`?"""
    if node.op_type != "Gather" or node.domain != "" or root is None or const_root(node.inputs[0]) is not root:
        return False
    axis = node.attributes.get("axis")
    return (axis is None or axis.value == 0) and tuple(weight_array(node.inputs[0]).shape) == shape
