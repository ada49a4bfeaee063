"""Linear sites: where activation sparsity saves work.

A *linear site* is a MatMul or Gemm whose weight operand is constant, directly or through
layout and dequantization ops. Found by graph structure alone, never by node names:
- each site consumes one activation tensor; each non-zero element of it costs `out_features`
  multiply-accumulates (MACs), so effective MACs = non-zeros x out_features;
- sites that read the same tensor form a group (q/k/v; gate/up) and share a threshold;
- an activation x activation MatMul (attention scores, attention x V) is not a site;
- a *head* (LM head, classifier) is a site whose output reaches a graph output through ops
  whose other inputs are all constant; it stays dense unless asked;
- a tensor that is already sparse by construction (ReLU, ReLU squared) is *natural*: it
  needs no threshold, and its measured sparsity counts toward the model-wide figure;
- an activation quantized on its way (DequantizeLinear(QuantizeLinear(x)), as in QDQ models)
  is seen through: its threshold sits on x, before the quantizer;
- a *compensation factor* (compensate-lowrank) is recognised by structure: factor 1 reads
  d = Sub(x, Threshold(x)), the part a threshold drops, factor 2 reads factor 1's output. Its
  MACs count, but it is never thresholded, never a head and forms no group of its own.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from sparsecc import ops

# Ops a constant weight may pass through on its way to the MatMul.
# (Mul: a grouped scale, as quantize-weights writes for blocks; its other input must be constant too.)
_WEIGHT_PATH = {"Transpose", "Cast", "Reshape", "DequantizeLinear", "Identity", "Squeeze", "Unsqueeze", "Mul"}
# Ops that change neither which elements are zero nor how many.
_LAYOUT = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"}


@dataclasses.dataclass(frozen=True)
class Site:
    index: int            # position in topological order
    node: str             # the MatMul/Gemm node's name, for people; never used for logic
    op: str
    consumes: str         # tensor the site reads (a Threshold's output once thresholded)
    source: str           # the activation before any threshold: the group key
    weight: str           # the constant at the root of the weight path
    in_features: int
    out_features: int
    head: bool
    natural: str | None   # "relu" / "relu2" when sparse by construction
    threshold: str | None  # name of the Threshold node feeding the site, if any
    group: int = -1
    compensates: str | None = None  # compensation factor: the Threshold whose dropped part it carries
    factor: int = 0        # which compensation factor: 1 reads d = x - Threshold(x), 2 reads d @ B

    @property
    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"macs_per_token": self.macs_per_token}


@dataclasses.dataclass(frozen=True)
class Analysis:
    sites: list[Site]
    attention_products: int   # activation x activation MatMuls
    declined: list[dict]      # MatMul/Gemm with a constant operand that are not sites, and why
    nodes: list[ir.Node]      # the site nodes, aligned with `sites`

    def groups(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for site in self.sites:
            if site.compensates is None:
                out.setdefault(site.source, []).append(site)
        return out


def const_root(value: ir.Value | None) -> ir.Value | None:
    """The constant a value is computed from through weight-path ops only, else None."""
    while value is not None:
        if value.const_value is not None:
            return value
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain == "":
            return value
        if node.op_type not in _WEIGHT_PATH or node.domain != "":
            return None
        if any(const_root(extra) is None for extra in node.inputs[1:] if extra is not None):
            return None
        value = node.inputs[0]
    return None


def _static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(value.shape)
    node = value.producer()
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    if node is None:
        return None
    if node.op_type == "Constant":
        attr = node.attributes.get("value")
        return tuple(attr.value.shape) if attr is not None else None
    src = _static_shape(node.inputs[0])
    if src is None:
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        perm = list(perm.value) if perm is not None else list(range(len(src)))[::-1]
        return tuple(src[p] for p in perm)
    if node.op_type == "Reshape":
        target = _const_array(node.inputs[1])
        if target is None:
            return None
        dims = [src[i] if d == 0 else int(d) for i, d in enumerate(target)]
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            dims[dims.index(-1)] = math.prod(src) // known
        return tuple(dims)
    if node.op_type in ("Cast", "Identity", "DequantizeLinear"):
        return src
    return None


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant operand (a shape, an exponent), else None."""
    return weight_array(value) if value is not None and const_root(value) is not None else None


def _skip_layout_back(value: ir.Value) -> ir.Value:
    node = value.producer()
    while node is not None and node.op_type in _LAYOUT and node.domain == "":
        value, node = node.inputs[0], node.inputs[0].producer()
    return value


def natural_sparsity(value: ir.Value) -> str | None:
    """'relu' or 'relu2' when `value` is a ReLU output (or its square), seen through layout ops."""
    value = _skip_layout_back(value)
    node = value.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Relu":
        return "relu"
    if node.op_type in ("Pow", "Mul"):
        base = _skip_layout_back(node.inputs[0])
        if node.op_type == "Pow":
            exponent = _const_array(node.inputs[1])
            squared = exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0
        else:
            squared = _skip_layout_back(node.inputs[1]) is base
        producer = base.producer()
        if squared and producer is not None and producer.op_type == "Relu" and producer.domain == "":
            return "relu2"
    return None


def activation_dtype(node: ir.Node) -> ir.DataType | None:
    """Element type of a site's activation: as declared, else that of its weight operand
    (MatMul and Gemm take one type), followed back through the weight path."""
    if node.inputs[0].dtype is not None:
        return node.inputs[0].dtype
    value = node.inputs[1]
    while value is not None and value.dtype is None:
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "Cast":
            return ir.DataType(producer.attributes["to"].value)
        if producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            return attr.value.dtype if attr is not None else None
        # DequantizeLinear yields its scale's type; the other weight-path ops keep their input's.
        value = producer.inputs[1] if producer.op_type == "DequantizeLinear" else producer.inputs[0]
    return value.dtype if value is not None else None


def dropped_by(value: ir.Value) -> ir.Node | None:
    """The Threshold whose dropped part `value` is (value = Sub(x, Threshold(x, t))), else None."""
    sub = value.producer()
    if sub is None or sub.op_type != "Sub" or sub.domain != "":
        return None
    threshold = sub.inputs[1].producer() if sub.inputs[1] is not None else None
    if threshold is None or not ops.is_threshold(threshold) or threshold.inputs[0] is not sub.inputs[0]:
        return None
    return threshold


def _is_head(node: ir.Node, linear: set[int]) -> bool:
    """Does `node`'s output reach a graph output through ops whose other inputs are constant?"""
    frontier, seen = [node.outputs[0]], set()
    while frontier:
        value = frontier.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value.is_graph_output():
            return True
        for user, index in value.uses():
            if id(user) in linear:
                continue
            others = [v for i, v in enumerate(user.inputs) if i != index and v is not None]
            if all(const_root(v) is not None for v in others):
                frontier.extend(user.outputs)
    return False


def analyze(graph: ir.Graph) -> Analysis:
    """Find the linear sites of `graph` (which must be topologically sorted)."""
    candidates, declined, attention = [], [], 0
    for node in graph:
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
            continue
        a, b = node.inputs[0], node.inputs[1]
        a_const, b_const = const_root(a) is not None, const_root(b) is not None
        if not a_const and not b_const:
            attention += 1
            continue
        if a_const and not b_const:
            declined.append({"node": node.name, "reason": "constant operand on the left (W @ x) is not supported"})
            continue
        if a_const and b_const:
            declined.append({"node": node.name, "reason": "both operands constant (fold it first)"})
            continue
        shape = _static_shape(b)
        if shape is None or len(shape) != 2:
            declined.append({"node": node.name, "reason": f"weight shape {shape} is not a static 2-D matrix"})
            continue
        k, n = shape
        if node.op_type == "Gemm":
            trans_b = node.attributes.get("transB")
            if trans_b is not None and trans_b.value:
                k, n = n, k
        candidates.append((node, k, n))
    linear = {id(node) for node, _, _ in candidates}
    sites, group_of = [], {}
    first_factors: dict[int, str] = {}   # compensation factor 1 node -> the Threshold it compensates
    for index, (node, k, n) in enumerate(candidates):
        consumes = node.inputs[0]
        quantizer = quantizer_of(consumes)
        before = quantizer.inputs[0] if quantizer is not None else consumes   # the float activation
        producer = before.producer()
        thresholded = producer is not None and ops.is_threshold(producer)
        source = producer.inputs[0] if thresholded else before
        dropped = dropped_by(before)
        compensates, factor = (dropped.name, 1) if dropped is not None else (first_factors.get(id(producer)), 2)
        if dropped is not None:
            first_factors[id(node)] = dropped.name
        group = group_of.setdefault(source.name, len(group_of)) if compensates is None else -1
        sites.append(Site(
            index=index, node=node.name or f"{node.op_type}#{index}", op=node.op_type,
            consumes=consumes.name, source=source.name, weight=const_root(node.inputs[1]).name,
            in_features=int(k), out_features=int(n), head=compensates is None and _is_head(node, linear),
            natural=natural_sparsity(source), threshold=producer.name if thresholded else None,
            group=group, compensates=compensates, factor=factor if compensates is not None else 0))
    return Analysis(sites, attention, declined, [node for node, _, _ in candidates])


def integer_type(value: ir.Value) -> ir.DataType | None:
    """The element type of a quantized tensor: as declared, else as its QuantizeLinear makes
    it (its zero point's type; uint8 without one)."""
    if value.dtype is not None:
        return value.dtype
    node = value.producer()
    if node is None or node.op_type != "QuantizeLinear" or node.domain != "":
        return None
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    return ir.DataType.UINT8 if zero is None else (zero.dtype or (zero.const_value.dtype if zero.const_value is not None else None))


def quantizer_of(value: ir.Value) -> ir.Node | None:
    """The QuantizeLinear of an activation quantized and dequantized on its way to a site
    (`value` = DequantizeLinear(QuantizeLinear(x))), else None."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
        return None
    q = dq.inputs[0].producer()
    return q if q is not None and q.op_type == "QuantizeLinear" and q.domain == "" else None


def weight_array(value: ir.Value) -> np.ndarray:
    """The numeric value of a constant-rooted weight operand, computed through its weight path."""
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node.op_type == "Constant":
        return node.attributes["value"].value.numpy()
    x = weight_array(node.inputs[0])
    attr = node.attributes.get
    if node.op_type == "Transpose":
        return np.transpose(x, attr("perm").value if attr("perm") is not None else None)
    if node.op_type == "Cast":
        return x.astype(ir.DataType(attr("to").value).numpy())
    if node.op_type == "Reshape":
        shape = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(weight_array(node.inputs[1]))]
        return x.reshape(shape)
    if node.op_type in ("Squeeze", "Unsqueeze"):
        axes = weight_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if node.op_type == "Squeeze":
            return np.squeeze(x, tuple(axes)) if axes is not None else np.squeeze(x)
        return np.expand_dims(x, tuple(int(a) for a in axes))
    if node.op_type == "Mul":
        return x * weight_array(node.inputs[1])
    if node.op_type == "DequantizeLinear":
        scale = weight_array(node.inputs[1])
        zero = weight_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
        axis = attr("axis").value if attr("axis") is not None else 1
        if np.ndim(scale) == 1 and x.ndim > 1:  # per-axis: line the scale up with `axis`
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
        return ((x.astype(np.float32) - zero) * scale).astype(scale.dtype)
    return x  # Identity


@dataclasses.dataclass(frozen=True)
class Int8Operands:
    """A site that integer hardware runs as int8 x int8: symmetric int8 weights (one scale per
    output neuron, or one for all) and symmetric int8 activations (one scale)."""
    weight: np.ndarray          # int8 [K, N]
    weight_scale: np.ndarray    # float32 [N]
    events: ir.Value            # the int8 activation: the QuantizeLinear output the site's DequantizeLinear reads
    event_scale: float
    dequantize: ir.Node         # that DequantizeLinear


def int8_weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weight [K, N], float32 scale per output neuron [N]) when a MatMul/Gemm site's
    weight is a symmetric int8 constant dequantized per output neuron or per tensor, else None."""
    transposed = node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value
    if node.op_type == "Gemm" and any(node.attributes.get(a) is not None and node.attributes[a].value != d
                                      for a, d in (("alpha", 1.0), ("beta", 1.0), ("transA", 0))):
        return None
    wq = _symmetric_int8_dequantize(node.inputs[1])
    if wq is None or wq[0].const_value is None:
        return None
    weight, scale = wq[0].const_value.numpy(), wq[1].astype(np.float32)
    if weight.ndim != 2 or (scale.size > 1 and wq[2] % 2 != (0 if transposed else 1)):  # one scale per output neuron
        return None
    weight = weight.T if transposed else weight
    if scale.size not in (1, weight.shape[1]):
        return None
    return weight, np.broadcast_to(scale.reshape(-1), (weight.shape[1],)).astype(np.float32)


def int8_operands(node: ir.Node) -> Int8Operands | None:
    """The integer form of a MatMul/Gemm site, or None when either operand is not symmetric int8."""
    weight = int8_weight(node)
    dq = node.inputs[0].producer()
    xq = _symmetric_int8_dequantize(node.inputs[0])
    if weight is None or xq is None or xq[1].size != 1:
        return None
    quantize = xq[0].producer()
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.domain != "":
        return None
    q_scale = _const_array(quantize.inputs[1])
    q_zero = _const_array(quantize.inputs[2]) if len(quantize.inputs) > 2 and quantize.inputs[2] is not None else None
    if (q_scale is None or q_scale.size != 1 or float(q_scale.reshape(())) != float(xq[1].reshape(()))
            or q_zero is None or np.any(q_zero != 0)):
        return None
    return Int8Operands(*weight, xq[0], float(xq[1].reshape(())), dq)


def _symmetric_int8_dequantize(value: ir.Value):
    """(int8 input, scale array, axis) when `value` is DequantizeLinear of int8 with zero point 0."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "":
        return None
    if integer_type(node.inputs[0]) != ir.DataType.INT8:
        return None
    scale = _const_array(node.inputs[1])
    if scale is None:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zero = _const_array(node.inputs[2])
        if zero is None or np.any(zero != 0):
            return None
    if node.attributes.get("block_size") is not None and node.attributes["block_size"].value:
        return None
    axis = node.attributes["axis"].value if node.attributes.get("axis") is not None else 1
    return node.inputs[0], scale, axis
