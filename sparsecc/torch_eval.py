"""An ONNX graph (onnx_ir) run with PyTorch ops, node by node, so a loss can be differentiated
with respect to the thresholds (finetune-bands).

Covers the ops of the exported Llama-family models (SmolLM2, the bundled sample), the tiny
test models and sparsecc's own outputs (Threshold, Q/DQ): see `_OPS`. Any other op fails at
construction with one line naming it. Weights stay constants (no gradient); nodes whose
inputs are all constant are evaluated once, at construction (weight transposes, dequantized
weights). Threshold nodes are computed by a caller-given function, so a caller can put
learned t values and a straight-through estimator in their place; the default is the op
itself, x where |x| > t else 0.

QuantizeLinear keeps its integers in the float type of its input, rounded with a
straight-through gradient, so gradients pass a Q/DQ pair as through the identity inside the
clipping range. Equal to ONNX Runtime to float32 rounding (tests/test_finetune.py states the
tolerance).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from sparsecc import ops
from sparsecc.errors import SparseccError

ThresholdFn = Callable[[ir.Node, torch.Tensor, torch.Tensor], torch.Tensor]


def hard_threshold(node: ir.Node, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The Threshold op: x where |x| > t, else 0."""
    return torch.where(x.abs() > t, x, torch.zeros((), dtype=x.dtype))


def as_torch(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)   # torch wants a writable, contiguous buffer it may share
    return torch.from_numpy(array)


class TorchGraph:
    """`run(feeds)` evaluates the model's graph outputs with torch."""

    def __init__(self, model: ir.Model):
        graph = model.graph
        for node in graph:
            if not ops.is_threshold(node) and (node.domain not in ("", "ai.onnx") or node.op_type not in _OPS):
                where = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
                raise SparseccError(f"the PyTorch evaluator does not support op {where}{node.op_type} "
                                    f"(node {node.name!r}); finetune-bands cannot run on this model")
        self.outputs = [v.name for v in graph.outputs]
        constants = {name: as_torch(v.const_value.numpy()) for name, v in graph.initializers.items()
                     if v.const_value is not None}
        self.nodes = []
        with torch.no_grad():
            for node in graph:   # fold what depends on constants only (weight layout, dequantization)
                names = [v.name for v in node.inputs if v is not None and v.name]
                if not ops.is_threshold(node) and all(n in constants for n in names):
                    constants.update(zip([o.name for o in node.outputs], _evaluate(node, [
                        constants[v.name] if v is not None and v.name else None for v in node.inputs])))
                else:
                    self.nodes.append(node)
        needed = {v.name for n in self.nodes for v in n.inputs if v is not None} | set(self.outputs)
        self.constants = {k: v for k, v in constants.items() if k in needed}
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                if v is not None and v.name:
                    last[v.name] = i
        self.free_after = [[] for _ in self.nodes]   # tensors dropped once their last reader ran
        for name, i in last.items():
            if name not in self.constants and name not in self.outputs:
                self.free_after[i].append(name)

    def run(self, feeds: dict, threshold: ThresholdFn = hard_threshold) -> list[torch.Tensor]:
        env = dict(self.constants)
        env.update({k: as_torch(v) for k, v in feeds.items()})
        for node, drop in zip(self.nodes, self.free_after):
            args = [env[v.name] if v is not None and v.name else None for v in node.inputs]
            outs = [threshold(node, *args)] if ops.is_threshold(node) else _evaluate(node, args)
            for value, out in zip(node.outputs, outs):
                env[value.name] = out
            for name in drop:
                del env[name]
        return [env[name] for name in self.outputs]


def _evaluate(node: ir.Node, args: list) -> list[torch.Tensor]:
    out = _OPS[node.op_type](node, *args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _dtype(onnx_type) -> torch.dtype:
    return torch.from_numpy(np.empty(0, ir.DataType(onnx_type).numpy())).dtype


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# Op implementations ---------------------------------------------------------------------------

def _slice(node, data, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, data.dim())
        n = data.shape[axis]
        if step > 0:
            start = min(max(start + n if start < 0 else start, 0), n)
            end = min(max(end + n if end < 0 else end, 0), n)
        else:
            start = min(max(start + n if start < 0 else start, -1), n - 1)
            end = min(max(end + n if end < 0 else end, -1), n - 1)
        index = torch.arange(start, end, step, dtype=torch.int64)
        data = data.index_select(axis, index)
    return data


def _gather(node, data, indices):
    axis = _axis(_attr(node, "axis", 0), data.dim())
    n = data.shape[axis]
    flat = indices.reshape(-1)
    flat = torch.where(flat < 0, flat + n, flat)
    return data.index_select(axis, flat).reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1:])


def _gather_nd(node, data, indices):
    if _attr(node, "batch_dims", 0) != 0:
        raise SparseccError(f"the PyTorch evaluator supports GatherND with batch_dims 0 only (node {node.name!r})")
    k = indices.shape[-1]
    shape = torch.tensor(data.shape[:k], dtype=torch.int64)
    indices = torch.where(indices < 0, indices + shape, indices)
    return data[tuple(indices[..., i] for i in range(k))]


def _unsqueeze(node, data, axes=None):
    axes = _ints(axes) if axes is not None else list(_attr(node, "axes"))
    rank = data.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        data = data.unsqueeze(axis)
    return data


def _squeeze(node, data, axes=None):
    axes = _ints(axes) if axes is not None else _attr(node, "axes")
    if axes is None:
        return data.squeeze()
    return data.squeeze(tuple(_axis(a, data.dim()) for a in axes))


def _reshape(node, data, shape):
    shape = _ints(shape)
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return data.reshape(shape)


def _expand(node, data, shape):
    return data.expand(torch.broadcast_shapes(data.shape, tuple(_ints(shape))))


def _reduce(fn):
    def reduce(node, data, axes=None):
        axes = _ints(axes) if axes is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return data
            axes = list(range(data.dim()))
        return fn(data, tuple(_axis(a, data.dim()) for a in axes), keep)
    return reduce


def _cumsum(node, x, axis):
    axis = _axis(int(axis.reshape(-1)[0]), x.dim())
    if _attr(node, "reverse", 0):
        x = x.flip(axis)
    out = x.cumsum(axis)
    if _attr(node, "exclusive", 0):
        out = out - x
    return out.flip(axis) if _attr(node, "reverse", 0) else out


def _div(node, a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _gemm(node, a, b, c=None):
    a = a.T if _attr(node, "transA", 0) else a
    b = b.T if _attr(node, "transB", 0) else b
    y = _attr(node, "alpha", 1.0) * (a @ b)
    return y if c is None else y + _attr(node, "beta", 1.0) * c


def _layer_norm(node, x, scale, bias=None):
    axis = _axis(_attr(node, "axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + _attr(node, "epsilon", 1e-5))
    y = (x - mean) * inv_std * scale
    return (y if bias is None else y + bias), mean, inv_std


def _split(node, x, split=None):
    axis = _axis(_attr(node, "axis", 0), x.dim())
    if split is not None:
        return torch.split(x, _ints(split), axis)
    parts = _attr(node, "num_outputs", len(node.outputs))
    return torch.split(x, math.ceil(x.shape[axis] / parts), axis)


def _per_axis(node, param: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-axis quantization parameter shaped to broadcast along the op's axis."""
    if param.dim() != 1 or rank < 2:
        return param
    shape = [1] * rank
    shape[_axis(_attr(node, "axis", 1), rank)] = param.shape[0]
    return param.reshape(shape)


def _dequantize(node, x, scale, zero=None):
    if _attr(node, "block_size", 0):
        raise SparseccError(f"the PyTorch evaluator does not support blocked DequantizeLinear (node {node.name!r})")
    scale = _per_axis(node, scale, x.dim())
    x = x.to(scale.dtype)
    return (x if zero is None else x - _per_axis(node, zero, x.dim()).to(scale.dtype)) * scale


def _quantize(node, x, scale, zero=None):
    """Integers held in x's float type; rounding passes gradients straight through."""
    info = torch.iinfo(zero.dtype if zero is not None else torch.uint8)
    scaled = x / _per_axis(node, scale, x.dim())
    rounded = scaled + (torch.round(scaled) - scaled).detach()   # round half to even, like ORT
    if zero is not None:
        rounded = rounded + _per_axis(node, zero, x.dim()).to(x.dtype)
    return rounded.clamp(info.min, info.max)


def _constant(node):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        value = _attr(node, key)
        if value is not None:
            array = value.numpy() if hasattr(value, "numpy") else np.array(
                value, np.float32 if "float" in key else np.int64)
            return as_torch(array)
    raise SparseccError(f"the PyTorch evaluator does not support Constant node {node.name!r}'s attribute")


def _constant_of_shape(node, shape):
    value = _attr(node, "value")
    fill = as_torch(value.numpy()) if value is not None else torch.zeros(1, dtype=torch.float32)
    return fill.reshape(()).expand(_ints(shape)).clone()


def _variadic(fn):
    def apply(node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return apply


def _unary(fn):
    return lambda node, x: fn(x)


def _binary(fn):
    return lambda node, a, b: fn(a, b)


_OPS: dict[str, Callable] = {
    # elementwise
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": lambda node, a, b: torch.pow(a, b).to(a.dtype),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt), "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not), "IsNaN": _unary(torch.isnan),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Cos": _unary(torch.cos), "Sin": _unary(torch.sin), "Tanh": _unary(torch.tanh), "Erf": _unary(torch.erf),
    "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Identity": _unary(lambda x: x),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Where": lambda node, c, a, b: torch.where(c, a, b),
    "Cast": lambda node, x: x.to(_dtype(_attr(node, "to"))),
    "CastLike": lambda node, x, like: x.to(like.dtype),
    # shapes and indexing
    "Shape": lambda node, x: torch.tensor(list(x.shape)[_attr(node, "start", 0):_attr(node, "end", None)],
                                          dtype=torch.int64),
    "Size": lambda node, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Reshape": _reshape, "Expand": _expand,
    "Flatten": lambda node, x: x.reshape(math.prod(x.shape[:_axis(_attr(node, "axis", 1), x.dim())]), -1),
    "Transpose": lambda node, x: x.permute(_attr(node, "perm") or tuple(reversed(range(x.dim())))),
    "Concat": lambda node, *xs: torch.cat(xs, _attr(node, "axis")),
    "Split": _split, "Slice": _slice, "Gather": _gather, "GatherND": _gather_nd,
    "Tile": lambda node, x, repeats: x.repeat(_ints(repeats)),
    "Range": lambda node, start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(),
                                                            dtype=start.dtype),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape,
    "CumSum": _cumsum,
    # reductions and normalization
    "ReduceMean": _reduce(lambda x, d, k: x.mean(d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(d, keepdim=k)),
    "Softmax": lambda node, x: torch.softmax(x, _attr(node, "axis", -1)),
    "LogSoftmax": lambda node, x: torch.log_softmax(x, _attr(node, "axis", -1)),
    "LayerNormalization": _layer_norm,
    # linear algebra and quantization
    "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "DequantizeLinear": _dequantize, "QuantizeLinear": _quantize,
}
