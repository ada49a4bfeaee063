"""Blocks of a regular model, found from graph structure, each cut out as its own model.

Threshold roles (the shapes of the sites a threshold feeds, see
threshold_search.thresholds_by_role) recur once or a few times per block: with L the greatest
common divisor of the roles' counts, a role's thresholds in graph order fall into L equal
consecutive runs, run k in block k (with one threshold per q/k/v, k and v share a role and
recur twice per block). Roles with no common count (L = 1) make one block: the whole model.
Never node names:
- a block's *output* is the first tensor from its last thresholded site on that everything
  its thresholds affect passes through (a post-dominator in graph order): the residual sum in
  a transformer, after any bias or compensation Add; for a model's last block without a
  residual, e.g. the head, the graph output;
- its *region* is every node its output depends on that the previous block's output does
  not; what the region reads from outside (the previous block's output, shared rotary tables
  or masks, graph inputs) is its *boundary*. A region must hold exactly its block's
  thresholds; the naturally sparse sites inside it count toward its MACs.

`BlockProbe` runs one region as its own ONNX Runtime session (ORT runs the whole graph
whatever outputs are asked for, so a full-model session would cost a full forward pass per
trial) fed with the dense model's boundary tensors: the block sees dense inputs, as in TEAL.
"""
from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from sparsecc import ops
from sparsecc.errors import SparseccError
from sparsecc.progress import log
from sparsecc.runtime import load_session, ort_session, saved_copy
from sparsecc.sites import Site, analyze
from sparsecc.threshold_search import SearchThreshold


@dataclasses.dataclass
class Block:
    index: int
    thresholds: list[SearchThreshold]   # graph order
    natural: list[Site]                 # naturally sparse sites in the region
    output: ir.Value
    nodes: list[ir.Node]                # the region, graph order
    boundary: list[ir.Value]            # computed tensors the region reads from outside it

    @property
    def macs(self) -> int:
        return sum(th.macs for th in self.thresholds) + sum(s.macs_per_token for s in self.natural)

    def sparsity(self, hists: dict, levels: dict) -> float:
        """MAC-weighted sparsity of the block's sites, thresholds at their group's level (or
        their input's exact zeros, if more), naturally sparse sites at theirs, less what any
        low-rank compensation costs (as threshold_search.model_sparsity counts it)."""
        zeroed = sum(th.macs * max(levels[th.group], hists[th.source].zeros) for th in self.thresholds)
        zeroed += sum(s.macs_per_token * hists[s.consumes].zeros for s in self.natural)
        zeroed -= sum(th.compensation.macs(levels[th.group], hists[th.source].zeros) for th in self.thresholds)
        return zeroed / self.macs if self.macs else 0.0


def find_blocks(model: ir.Model, thresholds: list[SearchThreshold]) -> tuple[list[Block], list[SearchThreshold]]:
    """The blocks, and the thresholds each on its own as group (role, block, slot: its rank among
    the block's thresholds of that role)."""
    count = collections.Counter(th.role for th in thresholds)
    layers = math.gcd(*count.values())
    if len(set(count.values())) > 1 and layers == 1:
        log("greedy-blocks: threshold roles recur " + ", ".join(sorted({str(n) for n in count.values()}))
            + " times, no common block count: one block, the whole model")
    seen_role: dict = collections.Counter()
    regrouped = []
    for th in thresholds:   # graph order: a role's i-th threshold is in block i // (its count / L)
        block, slot = divmod(seen_role[th.role], count[th.role] // layers)
        regrouped.append(dataclasses.replace(th, group=(th.role, block, slot)))
        seen_role[th.role] += 1
    graph = model.graph
    nodes_in_order = list(graph)
    position = {node: i for i, node in enumerate(nodes_in_order)}
    analysis = analyze(graph)
    site_node = dict(zip((s.node for s in analysis.sites), analysis.nodes))
    sites_of = collections.defaultdict(list)
    for s in analysis.sites:
        if s.threshold is not None:
            sites_of[s.threshold].append(site_node[s.node])
    natural_at = {site_node[s.node]: s for s in analysis.sites if s.natural and not s.head}
    covered: set = set()
    blocks = []
    for k in range(layers):
        members = [th for th in regrouped if th.group[1] == k]
        last = max((n for th in members for n in sites_of[th.node.name]), key=position.__getitem__)
        output = _block_output(nodes_in_order, [th.node for th in members], last, position)
        region = _ancestors(output, covered)
        covered |= region
        inside = [th.node.name for th in regrouped if th.node in region]
        if sorted(inside) != sorted(th.node.name for th in members):
            raise SparseccError(f"greedy-blocks found no regular block structure: block {k}'s output "
                                f"{output.name!r} depends on thresholds {sorted(inside)}, not on its own "
                                f"{sorted(th.node.name for th in members)}; use allocate-sparsity for this model")
        nodes = [n for n in graph if n in region]
        produced = {v for n in nodes for v in n.outputs}
        boundary = {v.name: v for n in nodes for v in n.inputs
                    if v is not None and v not in produced and not _is_initializer(v)}
        blocks.append(Block(k, members, [s for n, s in natural_at.items() if n in region], output, nodes,
                            [boundary[name] for name in sorted(boundary)]))
    return blocks, regrouped


def _block_output(nodes: list[ir.Node], thresholds: list[ir.Node], last: ir.Node, position: dict) -> ir.Value:
    """The first tensor, from `last` on, that everything the thresholds affect passes through:
    walking the graph in order, the first reached output that is then the only reached tensor
    still to be read (a post-dominator: the residual stream after the block). Shapes are not
    followed (a threshold changes no shape); graph outputs read by nothing (a KV cache) do not
    hold the walk open."""
    def last_read(value: ir.Value) -> int:
        return max((position[c] for c in value.consumers() if c.op_type not in _SHAPE_OPS and c in position), default=-1)

    reached = {t.outputs[0] for t in thresholds}
    live = {v: last_read(v) for v in reached}
    for node in nodes[min(position[t] for t in thresholds):]:
        i = position[node]
        if node.op_type not in _SHAPE_OPS and any(v in reached for v in node.inputs):
            for v in node.outputs:
                reached.add(v)
                live[v] = last_read(v)
        live = {v: end for v, end in live.items() if end > i}
        mine = [v for v in node.outputs if v in reached]
        if i >= position[last] and len(mine) == 1 and set(live) <= set(mine):
            return mine[0]
    raise SparseccError("greedy-blocks found no tensor that a block's whole effect passes through (no residual "
                        "stream); use allocate-sparsity for this model")


_SHAPE_OPS = {"Shape", "Size"}


def _is_initializer(value: ir.Value) -> bool:
    return value.producer() is None and value.const_value is not None


def _ancestors(value: ir.Value, covered: set) -> set:
    """The nodes `value` is computed from, stopping at `covered` ones (whose own ancestors are covered)."""
    found: set = set()
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in found or node in covered:
            continue
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise SparseccError(f"greedy-blocks cannot cut a block holding control flow ({node.op_type} node "
                                f"{node.name!r}); use allocate-sparsity for this model")
        found.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return found


def dense_boundaries(model: ir.Model, blocks: list[Block], feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Every block's boundary tensors per feed, from one run of the model as it is (dense: all t at 0)."""
    inputs = {v.name for v in model.graph.inputs}
    wanted = sorted({v.name for b in blocks for v in b.boundary} - inputs)
    with ort_session(model, wanted) as session:
        return [feed | dict(zip(wanted, session.run(wanted, feed))) for feed in feeds]


class BlockProbe:
    """One block's region in its own ONNX Runtime session: its thresholds' t and boundary
    tensors in, its output out. `error(levels)`: mean squared difference of the output from
    the block's dense output over the windows, with only this block's thresholds active."""

    def __init__(self, model: ir.Model, block: Block, hists: dict, boundaries: list[dict[str, np.ndarray]]):
        self.block, self.hists, self.passes = block, hists, 0
        self.feeds = [{v.name: b[v.name] for v in block.boundary} for b in boundaries]
        self.session = _region_session(model, block, boundaries[0])
        self.reference = [self._run(dict.fromkeys((th.group for th in block.thresholds), 0.0), f) for f in self.feeds]

    def _run(self, levels: dict, feed: dict) -> np.ndarray:
        ts = {th.node.inputs[1].name: ops.threshold_array(th.node, self.hists[th.source].threshold_for(levels[th.group]))
              for th in self.block.thresholds}
        self.passes += 1
        return self.session.run(None, feed | ts)[0]

    def error(self, levels: dict) -> float:
        total = 0.0
        for feed, reference in zip(self.feeds, self.reference):
            diff = self._run(levels, feed).astype(np.float64) - reference
            total += float(np.mean(diff * diff))
        return total / len(self.feeds)


def _region_session(model: ir.Model, block: Block, sample: dict[str, np.ndarray]):
    """An ONNX Runtime session on the block's region alone."""
    t_values = [th.node.inputs[1] for th in block.thresholds]
    constants = {v.name: v for n in block.nodes for v in n.inputs
                 if v is not None and _is_initializer(v) and v not in t_values}

    def initializer(value: ir.Value) -> onnx.TensorProto:   # inline: external data would point nowhere
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            tensor = ir.tensor(tensor.numpy(), name=tensor.name)
        proto = ir.serde.serialize_tensor(tensor)
        proto.name = value.name
        return proto

    def info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:   # rank and dims left open
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), None)

    inputs = [info(v.name, sample[v.name]) for v in block.boundary]
    inputs += [helper.make_tensor_value_info(v.name, int(v.const_value.dtype), list(v.const_value.shape))
               for v in t_values]   # a scalar, or one t per channel (weight-scores)
    graph = helper.make_graph([ir.serde.serialize_node(n) for n in block.nodes], f"block{block.index}", inputs,
                              [onnx.ValueInfoProto(name=block.output.name)],
                              initializer=[initializer(constants[k]) for k in sorted(constants)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in model.opset_imports.items()],
                              functions=[ir.serde.serialize_function(f) for f in model.functions.values()])
    proto.ir_version = model.ir_version
    with saved_copy(ir.serde.deserialize_model(proto)) as files:
        return load_session(files[0])
