"""An ONNX graph (onnx_ir) run with PyTorch ops, node by node, so a loss can be differentiated
with respect to the thresholds (finetune-bands) or the weights (distill), on the CPU or a GPU.

Covers the ops of the exported Llama-family models (SmolLM2, the bundled sample), the tiny
test models and sparsecc's own outputs (Threshold, Q/DQ): see `_OPS`. Any other op fails at
construction with one line naming it. Weights are constants unless named trainable; nodes
whose inputs are all constant are evaluated once, at construction (weight transposes,
dequantized weights). Threshold nodes are computed by a caller-given function, so a caller can put
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
    return torch.where(x.abs() > t, x, x.new_zeros(()))


def as_torch(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    array = np.asarray(array)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)   # torch wants a writable, contiguous buffer it may share
    return torch.from_numpy(array)


class TorchGraph:
    """`run(feeds)` evaluates the model's graph outputs with torch.

    `device`: where the values that depend on the feeds (and the trainable tensors) are
    computed. Everything else is computed on the CPU: constants, and what follows from them
    and from tensor shapes alone (Shape, index arithmetic, masks). Those values are the same
    for every feed of the same shapes, so they are computed once per input signature and
    reused, which keeps shape arithmetic off the accelerator and out of later runs.

    `trainable`: initializer names kept out of constant folding; `run(..., params=)` gives
    their values (e.g. torch Parameters; the initial values are in `initial`).
    """

    def __init__(self, model: ir.Model, device="cpu", trainable: frozenset[str] | set[str] = frozenset()):
        graph = model.graph
        for node in graph:
            if not ops.is_threshold(node) and (node.domain not in ("", "ai.onnx") or node.op_type not in _OPS):
                where = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
                raise SparseccError(f"the PyTorch evaluator does not support op {where}{node.op_type} "
                                    f"(node {node.name!r}); the passes that run models in PyTorch "
                                    "(finetune-bands, distill) cannot run on this model")
        self.device = torch.device(device)
        self.outputs = [v.name for v in graph.outputs]
        self.inputs = [v.name for v in graph.inputs]
        trainable = set(trainable)
        missing = sorted(trainable - set(graph.initializers))
        if missing:
            raise SparseccError(f"{missing[0]!r} is not an initializer of the model")
        constants = {name: as_torch(v.const_value.numpy()) for name, v in graph.initializers.items()
                     if v.const_value is not None}
        self.initial = {name: constants.pop(name) for name in sorted(trainable)}
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
        dynamic = feed_dependent(self.nodes, set(self.inputs) | trainable)
        self.dynamic = [node.outputs[0].name in dynamic for node in self.nodes]
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for v in node.inputs:
                if v is not None and v.name:
                    last[v.name] = i
        self.free_after = [[] for _ in self.nodes]   # dynamic tensors dropped once their last reader ran
        for name, i in last.items():
            if name in dynamic and name not in self.outputs and name not in trainable:
                self.free_after[i].append(name)
        self._static: dict[tuple, dict[str, torch.Tensor]] = {}    # input signature -> static values
        self._on_device: dict[str, torch.Tensor] = {}                # constants copied to the device

    def run(self, feeds: dict, threshold: ThresholdFn = hard_threshold, params: dict | None = None) -> list[torch.Tensor]:
        """The graph outputs for one feed dict (arrays or tensors)."""
        env = {k: as_torch(v).to(self.device) for k, v in feeds.items()}
        signature = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(env.items()))
        static = self._static.setdefault(signature, {})
        params = self.initial if params is None else params
        env.update(params)

        def value(name: str, host: bool):
            if name in env:
                return env[name]
            if name in static:
                return static[name] if host else static.setdefault(name + "@device", static[name].to(self.device))
            constant = self.constants[name]
            if host or self.device.type == "cpu":
                return constant
            if name not in self._on_device:
                self._on_device[name] = constant.to(self.device)
            return self._on_device[name]

        for node, dynamic, drop in zip(self.nodes, self.dynamic, self.free_after):
            if not dynamic and node.outputs[0].name in static:
                continue   # computed for an earlier feed of the same shapes
            host = _HOST_ARGS.get(node.op_type, ())
            args = [value(v.name, not dynamic or i in host) if v is not None and v.name else None
                    for i, v in enumerate(node.inputs)]
            outs = [threshold(node, *args)] if ops.is_threshold(node) else _evaluate(node, args)
            for out_value, out in zip(node.outputs, outs):
                (env if dynamic else static)[out_value.name] = out
            for name in drop:
                env.pop(name, None)
        return [value(name, False) for name in self.outputs]

    def run_batch(self, feeds: list[dict], threshold: ThresholdFn = hard_threshold,
                  params: dict | None = None) -> list[torch.Tensor]:
        """The graph outputs for several feed dicts of the same shapes, stacked on a new axis 0.
        The graph itself may have a batch size of 1 fixed in its shapes: torch.vmap runs it
        once for the whole stack, as one batched computation."""
        stacked = {k: torch.stack([as_torch(f[k]) for f in feeds]).to(self.device) for k in feeds[0]}
        names = sorted(stacked)

        def one(*values):
            return tuple(self.run(dict(zip(names, values)), threshold, params))
        return list(torch.vmap(one, randomness="same")(*[stacked[k] for k in names]))


def feed_dependent(nodes, sources: set[str]) -> set[str]:
    """The names of `sources` and of every value computed from their values, not just from
    their shapes (Shape and Size outputs are known from shapes alone)."""
    dynamic = set(sources)
    for node in nodes:
        if node.op_type not in ("Shape", "Size") and any(v is not None and v.name in dynamic for v in node.inputs):
            dynamic.update(o.name for o in node.outputs)
    return dynamic


# Inputs that ops read as shapes, axes or indices (kept on the CPU, read with .tolist()).
_HOST_ARGS = {"Reshape": (1,), "Slice": (1, 2, 3, 4), "Expand": (1,), "Tile": (1,), "Unsqueeze": (1,),
              "Squeeze": (1,), "Split": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
              "ReduceMin": (1,), "CumSum": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2)}


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
        index = torch.arange(start, end, step, dtype=torch.int64, device=data.device)
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
    shape = torch.tensor(data.shape[:k], dtype=torch.int64, device=indices.device)
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
