"""The seneca simulator: runs a compiled, partitioned model on the mesh, token step by token step.

Per step, every node runs as the handler of the core(s) the placement gives it:
- a linear site (and a constant-table Gather, the embedding) on its tiles, as event handlers:
  one event per non-zero input channel, executed vectorised over the window's tokens
  (`linear.run_tile`), counted per token from the handler's own program; a site with int8
  weights and int8 activations (`sites.int8_operands`) runs on the packed INT8 lanes, its
  events the QuantizeLinear's integers (the site's activation DequantizeLinear is folded
  into its scales); int8 weights with 16-bit events (`sites.int8_weight`) stay packed in
  memory and are unpacked to floats per event;
- any other op as a dense handler on its core (`dense`), with values from the ONNX reference
  implementation of the op on 16-bit inputs, rounded to 16 bit unless fused into a register;
- shape arithmetic that does not depend on the tokens' values is folded at compile time
  (free), as are constant weight paths.
Values cross cores as events: one 32-bit flit per non-zero value plus a header flit per
packet, along the XY multicast tree of the NoC (`Mesh.multicast_links`); the receiver takes
them into data memory (`dense.receive`). Latency per token is the event-driven schedule of
the step: a handler starts when its inputs have arrived and its core is free.

Tokens of a window are causal and independent within a step, so simulating the window's steps
side by side (vectorised) gives each token exactly what simulating it alone would; attention
products are sized for the window (every query row against every key of the window) as the
exported graph computes them.

A step graph (sparsecc.stepgraph) runs one token per `run`, its state fed in and read back
by the caller (`steps.py`). Each state is resident in the data memory of the core that
writes `new_state.i` (`Placement.states`): the handlers on that core read it with MLD as any
operand in memory, the writer stores the new state with MST (a KV-cache Concat onto its own
state appends the new position in place, not a copy of the cache), and a reader on another
core gets the state as events from its home core (MLD + EVC there, flits on the NoC,
`dense.receive` at the reader), as any value crossing cores.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from threadpoolctl import ThreadpoolController

from sparsecc import compensation, ops
from sparsecc.backends.seneca import cost, dense
from sparsecc.backends.seneca.codegen import LinearTile, linear_handler
from sparsecc.backends.seneca.linear import VALUE_FORMATS, counts_over, run_tile, step_counts
from sparsecc.backends.seneca.placement import Placement, Tile
from sparsecc.backends.seneca.program import Image, event_counts, loops, nest_counts
from sparsecc.backends.seneca.target import Target
from sparsecc.errors import SparseccError
from sparsecc.site_names import node_layers
from sparsecc.sites import analyze, const_root, int8_operands, int8_weight, weight_array
from sparsecc.stepgraph import is_step_graph

F32 = np.float32


@dataclasses.dataclass
class Work:
    """What one handler (a node's tile, or a dense node) executed over the window."""

    core: int
    counts: collections.Counter
    cycles: np.ndarray          # per token
    events_captured: int = 0
    listing: Callable[[], str] | None = None   # makes the handler's assembly for one token step (lower asks)

    @property
    def program(self) -> str:
        return self.listing() if self.listing is not None else ""


@dataclasses.dataclass
class StepResult:
    outputs: dict[str, np.ndarray]      # the graph's outputs and the values asked for with `keep`
    energy_pj: dict[str, float]
    per_core: dict[int, dict]
    per_layer: dict[str, dict]
    latency_cycles: np.ndarray          # per token
    events_sent: int
    events_received: int
    flits: int
    flit_hops: int
    mac_lane_ops: int                    # linear sites: events x active lanes of the tiles they reach
    dense_macs: int                      # linear sites: tokens x K x N
    tokens: int
    counts: collections.Counter
    compensation_pj: dict[str, float] = dataclasses.field(default_factory=dict)  # low-rank compensation's share of energy_pj
    compensation_mac_lane_ops: int = 0                   # its share of mac_lane_ops
    core_flits: dict[int, collections.Counter] = dataclasses.field(default_factory=dict)  # core -> flits "sent", "received"
    site_zeros: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # site -> (zero inputs, inputs), as its tiles read them


class Simulator:
    """Runs `model` (compiled and partitioned) on `target`. With `dense=True` the thresholds are
    taken out (each Threshold passes its input through): the dense baseline on the same placement,
    without low-rank compensation (its Add passes the site's output through, the rest is not run)."""

    def __init__(self, model: ir.Model, target: Target, dense_baseline: bool = False, image: Image | None = None):
        self.placement = Placement.of(model)
        self.image = image
        self.target = target
        self.dense_baseline = dense_baseline
        # values in memory, events and on the NoC: rounded to the target's format
        self.round = VALUE_FORMATS[target["numerics"]["value_format"]]
        self.graph = model.graph
        self.nodes = list(model.graph)
        self.by_name = {node.name: node for node in self.nodes}
        self.outputs = list(self.graph.outputs)   # as compiled (a session may add outputs to the graph for a while)
        self.output_names = {o.name for o in self.outputs}
        self.registers = target["core"]["register_words"]
        analysis = analyze(model.graph)
        self.sites = {site.node: site for site in analysis.sites}
        self.site_nodes = {node.name: node for node in analysis.nodes}
        self.compensation = compensation.nodes(analysis)   # costed apart in the report
        # each node's row of the report's per-layer breakdown
        self.layer = {name: "other" if k is None else f"layer {k}" for name, k in node_layers(model.graph, analysis).items()}
        self.int8 = {name: found for name, node in self.site_nodes.items() if (found := int8_operands(node))}
        # int8 weights with 16-bit float events: (weight, scale)
        self.w8 = {name: found for name, node in self.site_nodes.items()
                   if name not in self.int8 and (found := int8_weight(node))}
        self.tiles: dict[str, list[Tile]] = collections.defaultdict(list)
        self.weight_base: dict[Tile, int] = {}    # word address of each tile's weights on its core
        used: dict[int, int] = collections.Counter()
        for tile in self.placement.tiles:
            self.tiles[tile.owner].append(tile)
            shape = self._shape(tile, 0)
            self.weight_base[tile] = used[tile.core]
            used[tile.core] += shape.buffer_base + shape.buffer_words
        self._tile_counts: dict[str, dict] = {}   # node -> its tiles' handler counts, when it first runs
        self._nests: dict[tuple, collections.Counter] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.scales: dict[str, np.ndarray] = {}   # integer sites: the weight scale per neuron (16 bit)
        for name, node in self.site_nodes.items():
            if name in self.int8 or name in self.w8:
                weight, scale = ((self.int8[name].weight, self.int8[name].weight_scale) if name in self.int8
                                 else self.w8[name])
                self.weights[name], self.scales[name] = weight, self.round(scale)
                continue
            w = weight_array(node.inputs[1]).astype(F32)
            if node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value:
                w = w.T
            self.weights[name] = self.round(w)
        for name in self.tiles:
            if name not in self.weights:  # a constant-table Gather: the table [rows, width]
                self.weights[name] = self.round(weight_array(self.by_name[name].inputs[0]))
        self.cores = self.placement.node_cores()
        # a step graph's states: state.i -> its resident record (home core, bytes); new_state.i -> the same
        self.resident = {st.input: st for st in self.placement.states}
        self.state_writes = {st.output: st for st in self.placement.states}
        self._writer = {v.name: v.producer().name for v in self.outputs if v.name in self.state_writes}
        if is_step_graph(model) and not self.resident:
            raise SparseccError("this step graph was partitioned without its state; re-run compile --target seneca "
                                "with this sparsecc")
        missing = [n.name for n in self.nodes if n.name not in self.cores]
        if missing:
            raise SparseccError(f"{len(missing)} nodes have no core (e.g. {missing[0]}); re-run the partition pass")
        # The reference implementation of each op; initializers stay with onnx_ir (memory-mapped
        # external data), so the evaluator gets the graph without them.
        # Weight paths (Transpose, Cast, DequantizeLinear of a tiled weight) are folded into the tiles.
        self.folded = set()
        for name in self.tiles:
            node = self.by_name[name]
            value = node.inputs[1] if name in self.site_nodes else node.inputs[0]
            while (producer := value.producer()) is not None and producer.op_type != "Constant":
                self.folded.add(producer.name)
                value = producer.inputs[0]
        # an activation DequantizeLinear read only by integer sites becomes their scales
        unpacked = {found.dequantize.name: found for found in self.int8.values()}
        unpacked = {name: found for name, found in unpacked.items()
                    if all(user.name in self.int8 for user, _ in found.dequantize.outputs[0].uses())}
        self.folded |= set(unpacked)
        proto = ir.serde.serialize_model(model)
        del proto.graph.initializer[:]
        kept = [n for n in proto.graph.node if n.name not in self.folded]
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
            # onnx's reference runtime implements Q/DQ from opset 19 on (int8/uint8 behave as in 13)
            for entry in proto.opset_import:
                if entry.domain in ("", "ai.onnx") and entry.version < 19:
                    entry.version = 19
        self.evaluator = ReferenceEvaluator(proto)
        self.constants = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()
                          if v.const_value is not None}
        self.runners = {rt.onnx_node.name: rt for rt in self.evaluator.rt_nodes_}
        self.consumers: dict[str, list[ir.Node]] = collections.defaultdict(list)
        for node in self.nodes:
            for v in node.inputs:
                if v is not None:
                    self.consumers[v.name].append(node)
        for name, found in unpacked.items():  # the integer events go straight to the sites
            events = self.consumers[found.events.name]
            events[:] = [n for n in events if n.name != name] + self.consumers.pop(found.dequantize.outputs[0].name)
        self.live, self.live_values = self._data_dependent()
        self.live -= set(unpacked)
        self.fused = self._fused()
        # values a live node writes are already in the value format (or stay in registers: fused);
        # only graph inputs and constants are rounded where they are read
        self.formatted = {v.name for n in self.nodes if n.name in self.live for v in n.outputs}
        self.host = host_nodes(model, self.live)   # no handler: run on the host, not costed

    # Graph facts ---------------------------------------------------------------------------------
    def _data_dependent(self) -> tuple[set[str], set[str]]:
        return data_dependent(self.graph)

    def _kind(self, node: ir.Node) -> str:
        if node.name in self.tiles:
            return "tiled"
        if ops.is_threshold(node):
            return "view" if self.dense_baseline else "Threshold"
        if node.op_type in dense.VIEWS:
            return "view"
        return node.op_type

    def _fused(self) -> set[str]:
        """Values that stay in registers: made by a fusible op and read only by one fusible op on
        the same core."""
        out = set()
        for node in self.nodes:
            if node.name not in self.live or self._kind(node) not in dense.FUSIBLE:
                continue
            value = node.outputs[0]
            readers = self.consumers.get(value.name, [])
            if (len(readers) == 1 and readers[0].name in self.live and self._kind(readers[0]) in dense.FUSIBLE
                    and self.cores[readers[0].name] == self.cores[node.name]
                    and value.name not in self.output_names):
                out.add(value.name)
        return out

    # The step -------------------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], keep: tuple[str, ...] = (),
            decisions: dict[str, np.ndarray] | None = None) -> StepResult:
        """One window's token steps; `keep` names intermediate values to return beside the outputs.

        `decisions` (validation only) maps the outputs of step functions to a reference's
        values for them: a Threshold then keeps exactly the channels the reference kept, a
        QuantizeLinear yields the reference's integers, so a value within rounding of a step
        cannot send the two runs down different paths. Costs still come from the handler's own
        program.

        BLAS runs on one thread: OpenBLAS sums a product in another order with another thread
        count, so values (and every threshold decision after them) would depend on the machine's
        cores; and the tiles' products are small, so on busy cores its threads mostly wait for
        each other (a 9-head attention product: 1.5 ms on one thread, 190 ms on two)."""
        with _threadpools().limit(limits=1, user_api="blas"):
            return self._run(feeds, keep, decisions)

    def _run(self, feeds: dict[str, np.ndarray], keep: tuple[str, ...], decisions) -> StepResult:
        first = np.asarray(feeds[self.graph.inputs[0].name])
        # token ids [.., T], or embeddings [.., T, width]
        tokens = int(first.size if np.issubdtype(first.dtype, np.integer) else first.size // first.shape[-1])
        env: dict[str, np.ndarray] = {"": None}
        env.update(self.constants)
        env.update(feeds)
        work: dict[str, list[Work]] = {}
        lane_ops = dense_macs = compensation_ops = 0
        site_zeros = {}
        for node in self.nodes:
            if node.name in self.folded:
                continue
            kind = self._kind(node)
            inputs = [env[v.name] if v is not None and v.name in env else None for v in node.inputs]
            if self.dense_baseline and node.name in self.compensation:   # the baseline has no compensation
                site_output = [x for v, x in zip(node.inputs, inputs) if v.producer() is None
                               or v.producer().name not in self.compensation]
                outputs = site_output[:1] if node.op_type == "Add" else [None] * len(node.outputs)
            elif node.name not in self.live:                      # folded at compile time
                outputs = self._reference(node, inputs)
            elif kind == "tiled":
                outputs, work[node.name], macs = self._tiled(node, inputs, tokens, env)
                for v, out in zip(node.outputs, outputs):
                    if v.name in self.state_writes:   # the tile's outputs also stored into the resident state
                        home = self.state_writes[v.name].core
                        store = _times(dense.store(dense.groups_of(int(np.size(out)) // tokens)).counts, tokens)
                        work[node.name].append(Work(home, store, np.full(tokens, cost.cycles(store, self.target) / tokens, F32)))
                if node.name in self.sites:
                    lane_ops += macs
                    x = self._site_input(node, inputs[0], env)
                    site_zeros[node.name] = (int(x.size - np.count_nonzero(x)), int(x.size))
                    if node.name in self.compensation:
                        compensation_ops += macs
                    else:   # dense MACs: of the model without compensation
                        k, n = self.weights[node.name].shape
                        dense_macs += tokens * k * n
            else:
                live_inputs = [self._read(v, x) for v, x in zip(node.inputs, inputs)]
                if kind == "view":
                    outputs = [live_inputs[0]] if ops.is_threshold(node) else self._reference(node, live_inputs)
                else:
                    outputs = self._reference(node, live_inputs)
                    if decisions is not None and node.outputs[0].name in decisions:
                        ref = decisions[node.outputs[0].name]
                        outputs = [(ref if node.op_type == "QuantizeLinear" else np.where(ref != 0, live_inputs[0], 0))
                                   .astype(outputs[0].dtype)]
                    if node.name not in self.host:
                        work[node.name] = [self._dense_work(node, kind, live_inputs, outputs, tokens)]
                selects = (node.op_type in _MOVES or kind == "Threshold") and not any(
                    v is not None and v.name in self.fused for v in node.inputs)
                if not selects:  # a selection of values already in the value format needs no rounding
                    outputs = [o if v.name in self.fused or not _is_float(o) else self.round(o)
                               for v, o in zip(node.outputs, outputs)]
            for v, o in zip(node.outputs, outputs):
                env[v.name] = o
        self.work = work
        result = self._account(env, work, tokens, lane_ops, dense_macs, keep)
        result.compensation_mac_lane_ops = compensation_ops
        result.site_zeros = site_zeros
        return result

    def _read(self, value: ir.Value | None, x):
        """`x` as a handler reads it: rounded to the value format unless it already is."""
        if value is None or x is None or value.name in self.formatted or not _is_float(x):
            return x
        return self.round(x)

    def _reference(self, node: ir.Node, inputs: list) -> list:
        runner = self.runners[node.name]
        return list(runner.run(*inputs))

    def _shape(self, tile: Tile, weight_base: int) -> LinearTile:
        if tile.owner not in self.int8 and tile.owner not in self.w8:
            return LinearTile(tile.owner, *tile.k, *tile.n, weight_base)
        float_events = tile.owner in self.w8
        word = int(np.array(self._event_scale(tile.owner), np.float16).view(np.uint16))   # the target's 16-bit value
        return LinearTile(tile.owner, *tile.k, *tile.n, weight_base, int8=True, float_events=float_events, event_scale=word)

    def _event_scale(self, name: str) -> float:
        """The second factor an int8-weight tile multiplies by at capture."""
        return self.int8[name].event_scale if name in self.int8 else 1 / 256

    def _site_input(self, node: ir.Node, x, env: dict) -> np.ndarray:
        """What a site's tiles read: an integer site its int8 events, a float site its 16-bit input."""
        return np.asarray(env[self.int8[node.name].events.name]) if node.name in self.int8 else self._read(node.inputs[0], x)

    def _tiled(self, node: ir.Node, inputs: list, tokens: int, env: dict):
        w = self.weights[node.name]
        scale = self.scales.get(node.name)
        if node.name in self.sites:
            x = self._site_input(node, inputs[0], env)
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])
        else:  # embedding: a one-hot event per token (channel = token id, value 1)
            ids = np.asarray(inputs[1]).reshape(-1)
            lead = np.asarray(inputs[1]).shape
            x2 = None
        out = np.zeros((int(np.prod(lead)), w.shape[1]), F32)
        by_n: dict[tuple[int, int], list[np.ndarray]] = collections.defaultdict(list)
        first: dict[tuple[int, int], Tile] = {}    # the tile of each n-range that sums and sends
        works, macs = [], 0
        for tile in sorted(self.tiles[node.name], key=lambda t: (t.n, t.k)):
            (k0, k1), (n0, n1) = tile.k, tile.n
            shape = self._shape(tile, 0)
            if x2 is not None:
                partial, _, events, captured = run_tile(
                    shape, w[k0:k1, n0:n1], x2[:, k0:k1], self.registers, self.round,
                    *((scale[n0:n1], self.round(np.float32(self._event_scale(node.name)))) if scale is not None else ()))
            else:
                hit = (ids >= k0) & (ids < k1)
                events = hit.astype(np.int64)
                partial = np.where(hit[:, None], w[np.clip(ids, k0, k1 - 1), n0:n1], 0.0).astype(F32)
                captured = int(np.count_nonzero(partial))
            base, per_event = self._counts_of(node.name)[tile]
            counts = counts_over(base, per_event, events)
            cycles = cost.cycles(base, self.target) + cost.cycles(per_event, self.target) * events
            by_n[(n0, n1)].append(partial)
            first.setdefault((n0, n1), tile)
            works.append(Work(tile.core, counts, np.asarray(cycles, F32), captured,
                              functools.partial(linear_handler, self._shape(tile, self.weight_base[tile]), self.registers)))
            macs += int(events.sum()) * (n1 - n0)
        bias = self._bias(node)
        for (n0, n1), partials in by_n.items():
            core, groups = first[(n0, n1)].core, dense.groups_of(n1 - n0)
            # split by input channel: partial sums travel as 16-bit events to the first tile's core
            total = partials[0] if len(partials) == 1 else np.sum(partials, axis=0)
            if bias is not None:  # Gemm's C: added in the registers before capture (MLD + ADD per group)
                total = total + bias[n0:n1]
                add = dense.elementwise("Add", groups * tokens, [dense.Operand(True, 1)], False, False).counts
                works.append(Work(core, add, np.full(tokens, cost.cycles(add, self.target) / tokens, F32)))
            out[:, n0:n1] = self.round(total) if (len(partials) > 1 or bias is not None) else total
            if len(partials) > 1:
                extra = sum(int(np.count_nonzero(p)) for p in partials[1:])
                prog = dense.receive(extra, groups * (len(partials) - 1) * tokens)
                prog.counts.update(dense.elementwise("Add", groups * (len(partials) - 1) * tokens,
                                                     [dense.Operand(True, 1), dense.Operand(True, 2)], False, True).counts)
                works.append(Work(core, prog.counts, np.full(tokens, cost.cycles(prog.counts, self.target) / tokens, F32),
                                  int(np.count_nonzero(out[:, n0:n1]))))
        return [out.reshape(*lead, w.shape[1])], works, macs

    def _bias(self, node: ir.Node) -> np.ndarray | None:
        if node.op_type != "Gemm":
            return None
        for attr, default in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
            if node.attributes.get(attr) is not None and node.attributes[attr].value != default:
                raise SparseccError(f"Gemm {node.name} has {attr}={node.attributes[attr].value}; the seneca backend "
                                    f"takes Gemm with {attr}={default} only")
        if len(node.inputs) < 3 or node.inputs[2] is None:
            return None
        if const_root(node.inputs[2]) is None:
            raise SparseccError(f"Gemm {node.name} adds a computed C; the seneca backend takes constant biases only")
        return self.round(np.broadcast_to(weight_array(node.inputs[2]), (self.weights[node.name].shape[1],)))

    def _dense_work(self, node: ir.Node, kind: str, inputs: list, outputs: list, tokens: int) -> Work:
        core = self.cores[node.name][0]
        result = outputs[0]
        out_value = node.outputs[0]
        readers = self.consumers.get(out_value.name, [])
        # a new state is stored into its resident place, not sent to the host
        writes_state = out_value.name in self.state_writes
        send = any(self.cores[r.name] != self.cores[node.name] for r in readers) or (
            out_value.name in self.output_names and not writes_state)
        store = writes_state or (out_value.name not in self.fused
                                 and any(self.cores[r.name] == self.cores[node.name] for r in readers))
        operands = [dense.Operand(v is not None and v.name not in self.fused and v.name in self.live_values
                                  and x is not None and np.size(x) > 1, 1 + i)
                    for i, (v, x) in enumerate(zip(node.inputs, inputs))]
        if ops.is_threshold(node) and np.size(inputs[1]) > 1:   # one t per channel (weight-aware): an MLD per group
            operands[1] = dense.Operand(True, 2)
        size = int(np.size(result))
        per_token = max(1, size // tokens)
        if kind in dense.REDUCE:
            x = inputs[0]
            rows = max(1, size // tokens)
            length = max(1, int(np.size(x)) // max(1, size))
            program = dense.reduce(kind, rows, dense.groups_of(length), operands[0], store, send)
        elif kind == "Softmax":
            length = int(result.shape[-1])
            rows = max(1, size // length // tokens)
            program = dense.softmax(rows, dense.groups_of(length), operands[0], store, send)
        elif kind in dense.NORMS:
            length = int(result.shape[-1])
            program = dense.layernorm(max(1, size // length // tokens), dense.groups_of(length), operands[0], store, send)
        elif kind == "MatMul":
            a, b = inputs
            inner, n = int(a.shape[-1]), int(b.shape[-1])
            rows = max(1, size // n // tokens)
            program = dense.matmul(rows, inner, dense.groups_of(n), store, send, self.registers)
        elif kind == "Concat" and writes_state and self.state_writes[out_value.name].input in {
                v.name for v in node.inputs if v is not None}:
            # a KV cache grows in place: only the new position is written; the cache is read
            # (MLD + EVC) only when readers on other cores need it
            held = next(x for v, x in zip(node.inputs, inputs) if v is not None and v.name == self.state_writes[out_value.name].input)
            program = dense.copy(dense.groups_of((size - int(np.size(held))) // tokens), send)
            if send:
                program.extend(dense.send(dense.groups_of(int(np.size(held)) // tokens)))
        elif kind in dense.COPIES:
            program = dense.copy(dense.groups_of(per_token), send)
        else:
            general = kind == "Pow" and not (inputs[1] is not None and np.size(inputs[1]) == 1 and float(np.ravel(inputs[1])[0]) == 2.0)
            program = dense.elementwise(kind, dense.groups_of(per_token), operands, store, send, general_pow=general)
        if send:
            program.add("SEND 0")
        program.add("SYNC 0", "HALT")
        step = self._dense_counts(node, core, program)
        captured = int(np.count_nonzero(result)) if send else 0
        return Work(core, _times(step, tokens), np.full(tokens, cost.cycles(step, self.target), F32), captured,
                    functools.partial(program.text, f"{kind} {node.name}: one token step"))

    # Costs from the program image ---------------------------------------------------------------
    def _counts_of(self, name: str) -> dict[Tile, tuple[collections.Counter, collections.Counter]]:
        """Each tile of node `name` -> (counts of a step, extra counts per event) of its handler:
        the image's (its tiles on a core in (n, k) order, as lowering lays them out), else
        generated. Asked when the node runs on the chip: a table the host reads (a learned
        position embedding indexed by constants) has tiles but no handler."""
        if name in self._tile_counts:
            return self._tile_counts[name]
        tiles = sorted(self.tiles[name], key=lambda t: (t.n, t.k))
        if self.image is None:
            out = {tile: step_counts(self._shape(tile, 0), self.registers) for tile in tiles}
        else:
            out, by_core = {}, collections.defaultdict(list)
            for tile in tiles:
                by_core[tile.core].append(tile)
            for core, mine in by_core.items():
                loaded = self.image.handlers(core, name)
                if len(loaded) < len(mine):
                    raise SparseccError(f"program.bin has {len(loaded)} handlers for {name} on core {core}, the placement "
                                        f"{len(mine)} tiles; re-run compile --target seneca")
                for tile, handler in zip(mine, loaded):
                    out[tile] = event_counts(handler.instructions, self.registers)
        self._tile_counts[name] = out
        return out

    def _dense_counts(self, node: ir.Node, core: int, program: dense.Program) -> collections.Counter:
        """Instructions of one token step of a dense handler: the image's, its loop bounds bound to
        this window's shapes (`program`, generated for them). Where the window's context changes
        the nest itself (an attention product's accumulators per group of the context), the image,
        made for another context, cannot run it and the generated nest is counted."""
        if self.image is None:
            return program.counts
        key = (node.name, tuple(program.trips), len(program.lines))
        if key not in self._nests:
            loaded = self.image.handlers(core, node.name)
            if not loaded:
                raise SparseccError(f"program.bin has no handler for {node.name} on core {core}; "
                                    "re-run compile --target seneca")
            nest = loaded[0].instructions
            shape = [int(line.split(",")[1]) for line in program.lines if line.split()[0] == "LOOP"]
            same = len(nest) == len(program.lines) and [n for _, n in loops(nest)] == shape
            self._nests[key] = nest_counts(nest, program.trips) if same else program.counts
        return self._nests[key]

    # Traffic, energy, latency ---------------------------------------------------------------------
    def _account(self, env, work, tokens, lane_ops, dense_macs, keep) -> StepResult:
        mesh = self.placement.mesh
        energy = dict.fromkeys(cost.CATEGORIES, 0.0)
        compensation_energy = dict.fromkeys(cost.CATEGORIES, 0.0)
        per_core: dict[int, dict] = {}
        per_layer: dict[str, dict] = {}
        total_counts = collections.Counter()
        finish: dict[str, np.ndarray] = {}
        core_free: dict[int, np.ndarray] = {}
        sent = received = flits = flit_hops = 0
        core_flits: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        cph = self.target["noc"]["cycles_per_hop"]

        def charge(core: int, layer: str, counts, captured: int, noc_pj: float = 0.0, compensating: bool = False):
            e = cost.energy_pj(counts, captured, self.target)
            e["noc"] += noc_pj
            for bucket in (energy, per_core.setdefault(core, {**dict.fromkeys(cost.CATEGORIES, 0.0), "cycles": 0.0}),
                           per_layer.setdefault(layer, {**dict.fromkeys(cost.CATEGORIES, 0.0), "cycles": 0.0}),
                           *([compensation_energy] if compensating else [])):
                for c in cost.CATEGORIES:
                    bucket[c] += e[c]
            per_layer[layer]["cycles"] += cost.cycles(counts, self.target)   # handler (busy) cycles, all its cores

        zero = np.zeros(tokens, F32)

        def deliver(src: int, layer: str, value: np.ndarray, nonzero: int, dests: list[int], readers: list[ir.Node],
                    compensating: bool = False, receiver_compensating=lambda reader: False) -> None:
            """`nonzero` events of `value` from core `src` to the other cores in `dests`."""
            nonlocal sent, received, flits, flit_hops
            remote = [d for d in dests if d != src]
            if not remote or nonzero == 0:
                return
            links = mesh.multicast_links(src, remote)
            packet = nonzero + tokens   # a header flit per token step
            charge(src, layer, collections.Counter(), 0, cost.noc_energy_pj(packet, links, self.target),
                   compensating=compensating)
            sent += nonzero
            received += nonzero * len(remote)
            flits += packet
            flit_hops += packet * links
            core_flits[src]["sent"] += packet
            for dest in remote:
                core_flits[dest]["received"] += packet
            for reader in readers:  # the receiving dense handlers take events into memory
                if reader.name in self.tiles:
                    continue  # tile handlers RECV their events themselves (counted in their program)
                core = self.cores[reader.name][0]
                if core == src:
                    continue
                prog = dense.receive(nonzero, dense.groups_of(int(np.size(value)) // max(1, tokens)) * tokens)
                charge(core, self.layer[reader.name], prog.counts, 0, compensating=receiver_compensating(reader))
                total_counts.update(prog.counts)
                per_core[core]["cycles"] += cost.cycles(prog.counts, self.target)

        # a step graph's resident states: read out of memory and sent to readers on other cores
        state_ready: dict[str, np.ndarray] = {}
        for name, st in self.resident.items():
            value = env.get(name)
            readers = [r for r in self.consumers.get(name, []) if r.name in self.live]
            dests = sorted({c for r in readers for c in self.cores[r.name]} - {st.core})
            nonzero = int(np.count_nonzero(value)) if value is not None else 0
            if not dests or nonzero == 0:
                continue
            layer = self.layer[self._writer[st.output]]
            program = dense.send(dense.groups_of(int(np.size(value)) // tokens))
            program.add("SEND 0", "SYNC 0", "HALT")
            counts, cycles = _times(program.counts, tokens), np.full(tokens, cost.cycles(program.counts, self.target), F32)
            start = core_free.get(st.core, zero)
            core_free[st.core] = start + cycles
            charge(st.core, layer, counts, nonzero)
            per_core[st.core]["cycles"] += float(cycles.sum())
            total_counts.update(counts)
            state_ready[name] = start + cycles
            deliver(st.core, layer, value, nonzero, dests, readers)

        for node in self.nodes:
            if node.name not in self.live:
                continue
            layer = self.layer[node.name]
            # arrival of inputs: producer finish + NoC hops (+ one cycle per flit on the link)
            ready = zero
            for v in self._arrivals(node):
                if v is not None and v.name in state_ready and self.resident[v.name].core not in self.cores[node.name]:
                    home = self.resident[v.name].core
                    hops = max(mesh.hops(home, b) for b in self.cores[node.name])
                    ready = np.maximum(ready, state_ready[v.name] + hops * cph)
                    continue
                if v is None or v.name not in self.live_values or v.producer() is None or env.get(v.name) is None:
                    continue
                src = v.producer().name
                arrive = finish.get(src, zero)
                if self.cores[src] != self.cores[node.name]:
                    hops = max(mesh.hops(a, b) for a in self.cores[src] for b in self.cores[node.name])
                    arrive = arrive + hops * cph
                ready = np.maximum(ready, arrive)
            done = ready
            for w in work.get(node.name, []):
                start = np.maximum(ready, core_free.get(w.core, zero))
                end = start + w.cycles
                core_free[w.core] = end
                done = np.maximum(done, end)
                charge(w.core, layer, w.counts, w.events_captured, compensating=node.name in self.compensation)
                per_core[w.core]["cycles"] += float(w.cycles.sum())
                total_counts.update(w.counts)
            finish[node.name] = done
            # events out of this node to the cores of its readers
            for v in node.outputs:
                readers = [r for r in self.consumers.get(v.name, []) if r.name in self.live]
                dests = sorted({c for r in readers for c in self.cores[r.name]})
                value = env.get(v.name)
                if value is None or not dests or not (_is_float(value) or value.dtype == np.int8):
                    continue
                sources = self._sources(node, value)
                for src, nonzero in sources:
                    deliver(src, layer, value, nonzero, dests, readers,
                            compensating=node.name in self.compensation and node.op_type != "Add",
                            receiver_compensating=lambda reader: reader.name in self.compensation)
        outputs = {name: env[name] for name in [o.name for o in self.outputs] + list(keep)}
        latency = np.max(np.stack([finish.get(o.producer().name, zero) for o in self.outputs]), axis=0)
        return StepResult(outputs, energy, per_core, per_layer, latency, sent, received, flits, flit_hops,
                          lane_ops, dense_macs, tokens, total_counts,
                          compensation_energy if self.compensation and not self.dense_baseline else {},
                          core_flits=dict(core_flits))

    def _arrivals(self, node: ir.Node) -> list[ir.Value | None]:
        """The values whose arrival a node's handler waits for: an integer site's are its events."""
        if node.name in self.int8 and self.int8[node.name].dequantize.name in self.folded:
            return [self.int8[node.name].events]
        return list(node.inputs)

    def _sources(self, node: ir.Node, value: np.ndarray) -> list[tuple[int, int]]:
        """(core, non-zero values it sends) for a node's output: per n-range tile for tiled nodes."""
        if node.name not in self.tiles:
            return [(self.cores[node.name][0], int(np.count_nonzero(value)))]
        flat = value.reshape(-1, value.shape[-1])
        out = []
        for tile in self.tiles[node.name]:
            if tile.k[0] != min(t.k[0] for t in self.tiles[node.name] if t.n == tile.n):
                continue  # the first k-tile of an n-range sends the summed outputs
            out.append((tile.core, int(np.count_nonzero(flat[:, tile.n[0]:tile.n[1]]))))
        return out


# Ops whose outputs are elements of their inputs (or zeros): no rounding after them.
_MOVES = (dense.VIEWS | dense.COPIES) - {"Cast", "CastLike", "CumSum", "Range", "ConstantOfShape"}


def data_dependent(graph: ir.Graph) -> tuple[set[str], set[str]]:
    """Nodes whose outputs depend on the values of the graph inputs (not only their shapes),
    and those values (the graph inputs and the nodes' outputs)."""
    live_values = {v.name for v in graph.inputs}
    live = set()
    for node in graph:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(v is not None and v.name in live_values for v in node.inputs):
            live.add(node.name)
            live_values |= {v.name for v in node.outputs}
    return live, live_values


def host_nodes(model: ir.Model, live: set[str] | None = None) -> dict[str, str]:
    """Nodes the cores have no handler for (node -> reason), among those that depend on the
    input values. They run on the host: the simulator takes their values from the reference
    and counts no cost for them; compile reports them as declined, simulate lists them."""
    tiled = {tile.owner for tile in Placement.of(model).tiles}
    live = data_dependent(model.graph)[0] if live is None else live
    return {n.name: f"no seneca handler for {n.op_type}: runs on the host, its cost is not counted"
            for n in model.graph if n.name in live and n.name not in tiled and not ops.is_threshold(n)
            and not dense.supported(n.op_type)}


@functools.cache
def _threadpools() -> ThreadpoolController:
    """The process's thread pools, found once (a step graph runs once per token)."""
    return ThreadpoolController()


def _is_float(x) -> bool:
    return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)


def _times(counts: collections.Counter, steps: int) -> collections.Counter:
    """`counts` of one token step, over `steps` steps."""
    return collections.Counter({op: n * steps for op, n in counts.items()})
