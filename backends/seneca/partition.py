"""partition: cut the model into core-sized pieces and place them on the target's mesh.

The pass tags, it does not rewrite: every node gets `metadata_props["sparsecc.cores"]` and the
model gets the whole placement as JSON in `metadata_props["sparsecc.placement"]`
(see sparsecc.backends.seneca.placement for the data model).

1. Tiles. Each linear site's [K, N] weight is cut into the fewest equal-ish slices of output
   neurons (n) that fit a core; by input channel (k) as well only when one neuron's column
   does not fit. A constant-table Gather is cut by table rows the same way. A Gather reading
   the same table as a site (tied embedding and LM head) reuses that site's tiles, transposed,
   so the table is held once.
2. Partitions. Walking the graph in topological order, tiles and other nodes are packed
   next-fit into partitions of at most `headroom` x data memory: neighbours in the graph
   share a core, and nodes needing no memory (shape ops) land with their producer.
3. Layout. Partitions go along the mesh in snake order (consecutive ones are neighbours),
   then a bounded, deterministic local search swaps pairs while that lowers the per-token
   byte-hops of the traffic graph.

Memory model (16-bit words unless the weights are packed INT8): weights K x N x weight_bits,
8 bits for a site with symmetric int8 weights (`sites.int8_weight`, which the seneca backend
keeps packed two per word) plus a 16-bit scale per output neuron;
2 bytes of accumulator per output neuron of a tile, twice that when split by k (the partial
sums of the previous token are still being sent); constants read by a node (norm weights,
rotary tables, shape constants) once per core that reads them, 2 bytes per element; an
attention product (activation x activation MatMul) keeps its non-query operand for
`max_context` positions: max_context x (that operand's elements per position, as stored
before head-repeating Expands) x 2 bytes. Nodes on a weight's path (Transpose, Cast,
DequantizeLinear) are folded into its tiles.

Step graphs (sparsecc.stepgraph): each state lives on the core of the node that writes
`new_state.i` (its readers on other cores get it as events), in 16-bit words like every
other activation (not the exported float32): its elements at position 0, plus for a growing
KV cache room for `max_context` positions. The cache is the state, so attention products of
a step graph keep nothing of their own. A state that does not fit its core is refused,
naming the core; the report says up to which context each growing state fits.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import networkx as nx
import onnx_ir as ir

from sparsecc.backends.seneca.placement import CATEGORIES, METADATA_KEY, STEP_STATE, WORD, Mesh, Placement, ResidentState, Tile
from sparsecc.backends.seneca.target import Target, builtin, load_target
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, Pass, PassResult, require
from sparsecc.sites import analyze, const_root, int8_weight
from sparsecc.stepgraph import is_step_graph, read_spec, state_input, state_output

MIB = 2**20
# Ops an attention operand passes through without changing what is stored per position.
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Expand", "Flatten"}
_SCALING = {"Mul", "Div", "Add", "Sub"}
# Local search: swap partners within this Manhattan radius, for at most this many sweeps and
# flow-cost evaluations (a count, unlike a clock, keeps the result deterministic).
RADIUS = 2
SWEEPS = 6
BUDGET = 1_000_000


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    target: str = option("seneca", "hardware target: a built-in name (`sparsecc list targets`) or a target TOML file")
    weight_bits: int = option(16, "bits per stored weight of float sites: 16, or 8 to size them as packed INT8 "
                                  "(sites with int8 weights always take 8)")
    max_context: int = option(256, "positions of attention state (K/V) kept resident per attention product "
                                   "(a step graph's growing KV cache: positions of room reserved on its core)",
                             within="[1, inf)")
    headroom: float = option(0.9, "fraction of each core's data memory the model may use; the rest is for "
                                  "event queues and the stack", within="(0, 1]")

    def __post_init__(self):
        if self.weight_bits not in (8, 16):
            raise SparseccError(f"weight_bits must be 16 or 8 (got {self.weight_bits})")


class Partition(Pass):
    """Tile linear sites and embeddings to fit the target's cores and place everything on its mesh (tags only)."""

    name = "partition"
    Config = PartitionConfig

    def check(self, model: ir.Model, ctx: Context) -> None:
        names = [node.name for node in model.graph]
        require(all(names) and len(set(names)) == len(names),
                "partition needs every node to have a unique name (the placement refers to nodes by name); "
                "name them first, e.g. with onnx_ir.passes.common.NameFixPass")

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        c = self.config
        target = load_target(c.target)
        mesh = Mesh(target["mesh"]["rows"], target["mesh"]["cols"])
        capacity = int(c.headroom * target["core"]["data_memory_bytes"])
        graph, unit = model.graph, c.weight_bits // 8
        found = _find_tiled(graph)
        step = is_step_graph(model)
        memory = {node.name: _op_memory(node, found, 0 if step else c.max_context)
                  for node in graph if found.is_op(node.name)}
        states = _states(model, c.max_context) if step else []
        state_load: dict[str, int] = {}
        for s in states:
            state_load[s.writer] = state_load.get(s.writer, 0) + s.reserved
        _check_fits(found, memory, unit, mesh, capacity, target, c, sum(state_load.values()))
        cuts = {name: _site_cuts(k, n, 1 if name in found.int8 else unit, capacity, bias, name in found.int8)
                for name, (k, n, bias) in found.sites.items()}
        cuts |= {name: _table_cuts(rows, width, unit, capacity)
                 for name, (rows, width) in found.tables.items() if name not in found.tied}
        parts, homes, op_part = _pack(graph, cuts, memory, capacity, state_load)
        if len(parts) > mesh.cores:
            need = sum(sum(p.load.values()) for p in parts)
            short = len(parts) - mesh.cores
            raise SparseccError(f"the tiled model needs {len(parts)} cores of {_size(capacity)} usable "
                                f"({_size(need)} in all), target {target.name!r} has {mesh.cores} "
                                f"(short by {short} core{'s' if short > 1 else ''}): {_fix(c)}")
        for gather, site in found.tied.items():  # the shared table's tiles are the site's, transposed
            homes[gather] = [(_Cut(cut.n, cut.k, 0, 0), part) for cut, part in homes[site]]
        traffic = _traffic(graph, len(parts), homes, op_part, found)
        snake = [mesh.snake(i) for i in range(len(parts))]
        cores, swaps, evaluations = _improve(mesh, snake, traffic)
        # Weight-path nodes (a weight's Transpose, Cast, ...) are folded into the tiles: they sit with the first.
        op_part |= {name: homes[owner][0][1] for name, owner in found.followers.items()}
        placement = Placement(
            c.target if c.target in builtin() else str(target.path.resolve()), mesh.rows, mesh.cols, c.weight_bits,
            tiles=[Tile(node.name, cores[part], cut.k, cut.n, cut.weight_bytes, cut.state_bytes)
                   for node in graph if node.name in homes for cut, part in homes[node.name]],
            ops={name: cores[part] for name, part in op_part.items()},
            memory={cores[i]: dict(p.load) for i, p in enumerate(parts)},
            states=tuple(ResidentState(s.input, s.output, s.role,
                                       cores[op_part[s.writer]] if s.writer in op_part else cores[homes[s.writer][0][1]],
                                       s.bytes, s.per_position, c.max_context if s.per_position else 0)
                         for s in states),
            usable_bytes=capacity if states else 0)
        _check_states(placement, capacity, c)
        on = placement.node_cores()
        for node in graph:
            node.metadata_props["sparsecc.cores"] = ",".join(map(str, on[node.name]))
        model.metadata_props[METADATA_KEY] = placement.to_json()
        return PassResult(_report(placement, target, capacity, found, traffic, snake, cores, swaps, evaluations))


# What is tiled ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Tiled:
    sites: dict[str, tuple[int, int, bool]] = dataclasses.field(default_factory=dict)  # -> (K, N, Gemm bias?)
    int8: set[str] = dataclasses.field(default_factory=set)  # sites with int8 weights (packed two per word)
    tables: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # table Gather -> (rows, width)
    tied: dict[str, str] = dataclasses.field(default_factory=dict)  # Gather sharing a site's weight -> the site
    followers: dict[str, str] = dataclasses.field(default_factory=dict)  # weight-path node -> the node it feeds
    weights: set[str] = dataclasses.field(default_factory=set)  # constant roots held in tiles
    widths: dict[str, int] = dataclasses.field(default_factory=dict)  # tiled node -> output elements per position

    def is_op(self, name: str) -> bool:
        return name not in self.sites and name not in self.tables and name not in self.followers


def _weight_path(value: ir.Value) -> list[ir.Node]:
    """The nodes between a constant-rooted value and its root."""
    nodes = []
    while (node := value.producer()) is not None:
        nodes.append(node)
        if node.op_type == "Constant":
            break
        value = node.inputs[0]
    return nodes


def _table(node: ir.Node) -> tuple[int, int] | None:
    """(rows, width) of a Gather that looks rows up in a constant 2-D table, else None."""
    if node.op_type != "Gather" or node.domain != "" or const_root(node.inputs[0]) is None:
        return None
    axis = node.attributes.get("axis")
    shape = node.inputs[0].shape
    if (axis is not None and axis.value != 0) or shape is None or len(shape) != 2 or not shape.is_static():
        return None
    return shape[0], shape[1]


def _find_tiled(graph: ir.Graph) -> _Tiled:
    found = _Tiled()
    by_weight: dict[str, tuple[str, int, int]] = {}
    analysis = analyze(graph)
    for site, node in zip(analysis.sites, analysis.nodes):
        bias = node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None
        found.sites[node.name] = (site.in_features, site.out_features, bias)
        if int8_weight(node) is not None:
            found.int8.add(node.name)
        found.widths[node.name] = site.out_features
        by_weight.setdefault(site.weight, (node.name, site.in_features, site.out_features))
        for path_node in _weight_path(node.inputs[1]):
            found.followers.setdefault(path_node.name, node.name)
    for node in graph:
        table = _table(node)
        if table is None:
            continue
        found.tables[node.name] = table
        found.widths[node.name] = table[1]
        root = const_root(node.inputs[0]).name
        site = by_weight.get(root)
        if site is not None and table == (site[2], site[1]):  # table [N, K]: the site's weight transposed
            found.tied[node.name] = site[0]
        for path_node in _weight_path(node.inputs[0]):
            found.followers.setdefault(path_node.name, node.name)
        found.weights.add(root)
    found.weights |= set(by_weight)
    return found


# Memory -----------------------------------------------------------------------------------------

def _elements(root: ir.Value) -> int:
    tensor = root.const_value
    if tensor is None:  # a Constant node's output
        attr = root.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    return math.prod(tensor.shape) if tensor is not None else 1  # value_float, value_ints, ...: tiny


def _per_position(value: ir.Value, widths: dict[str, int]) -> int:
    """Elements per sequence position: the product of the static dims (symbolic dims, the
    sequence, count once). Where a shape is unknown (common in exported attention, or without
    shape inference): the output width of the site or table producing it, else the nearest
    upstream value along first non-constant inputs whose shape is known."""
    for _ in range(64):
        shape = value.shape
        if shape is not None and all(isinstance(d, int) or d.value is not None for d in shape):
            return math.prod(d for d in shape if isinstance(d, int))
        producer = value.producer()
        if producer is None:
            break
        if producer.name in widths:
            return widths[producer.name]
        value = next((v for v in producer.inputs if v is not None and const_root(v) is None), None)
        if value is None:
            break
    return 1


def _stored(value: ir.Value) -> ir.Value:
    """The tensor an attention operand is kept as: before layout ops, head-repeating Expands
    (grouped-query attention keeps K/V unrepeated) and scaling by constants."""
    while (node := value.producer()) is not None and node.domain == "" and node.inputs and node.inputs[0] is not None:
        scaling = node.op_type in _SCALING and all(const_root(v) is not None for v in node.inputs[1:] if v is not None)
        if node.op_type not in _PASS_THROUGH and not scaling:
            break
        value = node.inputs[0]
    return value


def _op_memory(node: ir.Node, found: _Tiled, max_context: int) -> tuple[int, dict[str, int]]:
    """(KV bytes, {constant: bytes}) that a node which is not tiled keeps on its core."""
    constants = {}
    if node.op_type == "Constant":
        constants[node.outputs[0].name] = _elements(node.outputs[0]) * WORD
    for value in node.inputs:
        root = const_root(value) if value is not None else None
        if root is not None and root.name not in found.weights:
            constants[root.name] = _elements(root) * WORD
    attention = (node.op_type == "MatMul" and node.domain == ""
                 and const_root(node.inputs[0]) is None and const_root(node.inputs[1]) is None)
    kv = max_context * _per_position(_stored(node.inputs[1]), found.widths) * WORD if attention else 0
    return kv, constants


@dataclasses.dataclass(frozen=True)
class _State:
    input: str
    output: str
    role: str
    writer: str          # the node that writes new_state.i: the state lives on its core
    bytes: int           # at position 0
    per_position: int    # bytes added per token (a KV cache)
    reserved: int        # bytes the writer's core holds for it


def _states(model: ir.Model, max_context: int) -> list[_State]:
    """A step graph's states, in 16-bit words, each with the node that writes it."""
    spec = read_spec(model)
    writers = {v.name: node.name for node in model.graph for v in node.outputs}
    out = []
    for i, s in enumerate(spec.states):
        writer = writers.get(state_output(i))
        if writer is None:
            raise SparseccError(f"step graph output {state_output(i)} is not written by any node; re-export the model")
        fixed = math.prod(0 if d == "past" else int(d) for d in s.shape) * WORD
        per_position = math.prod(int(d) for d in s.shape if d != "past") * WORD if s.grow_axis is not None else 0
        out.append(_State(state_input(i), state_output(i), s.role, writer, fixed, per_position,
                          fixed + per_position * max_context))
    return out


def _check_states(placement: Placement, capacity: int, config: PartitionConfig) -> None:
    """Every core holding state within its usable memory, else a one-line error naming it."""
    totals = placement.core_bytes()
    for s in placement.states:
        if totals[s.core] <= capacity:
            continue
        x, y = placement.core_xy(s.core)
        held = s.bytes + s.bytes_per_position * s.reserved_positions
        grows = f" (room for {s.reserved_positions} positions)" if s.bytes_per_position else ""
        fix = "raise core.data_memory_bytes in the target file (a target with bigger cores)"
        if s.bytes_per_position:
            fix += f" or compile with a max_context below {config.max_context}"
        raise SparseccError(f"state {s.input} ({s.role}, {_size(held)}{grows}) does not fit core {s.core} "
                            f"(x={x}, y={y}): it would hold {_size(totals[s.core])} of {_size(capacity)} usable: {fix}")


def _size(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size / 1024:.1f} KiB"


def _fix(config: PartitionConfig, kv_would_do: bool = False) -> str:
    fixes = ["use a bigger mesh (mesh.rows/cols in the target file)",
             "more data memory per core (core.data_memory_bytes)"]
    if config.weight_bits == 16:
        fixes.append("weight_bits=8")
    if kv_would_do:
        fixes.append(f"a max_context below {config.max_context}")
    return ", ".join(fixes[:-1]) + " or " + fixes[-1]


def _check_fits(found: _Tiled, memory: dict[str, tuple[int, dict[str, int]]], unit: int, mesh: Mesh,
                capacity: int, target: Target, config: PartitionConfig, state: int = 0) -> None:
    """Before cutting anything: weights, accumulators, KV state and (once each) constants
    against the whole mesh; then every node's own memory against one core."""
    need = sum(k * n * unit + n * WORD for k, n, _ in found.sites.values())
    need += sum(r * w * unit for name, (r, w) in found.tables.items() if name not in found.tied)
    constants = {name: size for _, own in memory.values() for name, size in own.items()}
    kv = sum(kv for kv, _ in memory.values())
    need += kv + sum(constants.values()) + state
    usable = mesh.cores * capacity
    if need > usable:
        raise SparseccError(f"model needs {_size(need)} of data memory, target {target.name!r} has "
                            f"{_size(usable)} usable in {mesh.cores} cores (short by {_size(need - usable)}): "
                            f"{_fix(config, kv_would_do=kv > need - usable)}")
    for name, (kv, own) in memory.items():
        if kv + sum(own.values()) > capacity:
            raise SparseccError(f"node {name!r} alone needs {_size(kv + sum(own.values()))} ({_size(kv)} of "
                                f"attention state), more than a core's usable {_size(capacity)}: "
                                "lower max_context or raise core.data_memory_bytes")


# Tiling -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Cut:
    """A tile before it has a core."""
    k: tuple[int, int]
    n: tuple[int, int]
    weight_bytes: int
    state_bytes: int


def _ranges(length: int, parts: int) -> list[tuple[int, int]]:
    """[0, length) in `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(length, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(itertools.pairwise(bounds))


def _grid(inner: int, outer: int, unit: int, capacity: int, state: int, split_state: int) -> tuple[int, int]:
    """(pieces along inner, pieces along outer) for a matrix whose outer slices cost
    inner x unit bytes + `state`: the fewest cuts of the outer axis, cutting the inner axis
    too (each slice then costing `split_state`) only as far as one slice needs to fit."""
    for pieces in range(1, inner + 1):
        per_slice = math.ceil(inner / pieces) * unit + (state if pieces == 1 else split_state)
        if per_slice <= capacity:
            return pieces, math.ceil(outer / (capacity // per_slice))
    raise SparseccError(f"a core's usable data memory ({capacity} bytes) cannot hold even one weight and its "
                        "accumulator; raise core.data_memory_bytes in the target file or the headroom")


def _site_cuts(k: int, n: int, unit: int, capacity: int, bias: bool, scaled: bool = False) -> list[_Cut]:
    """By output neurons first. A Gemm bias costs a word per neuron (held by the k0 = 0 slice),
    an integer site's scale a word per neuron in every slice (each scales its own partial sums)."""
    extra = WORD * (bias + scaled)
    pieces_k, pieces_n = _grid(k, n, unit, capacity, WORD + extra, 2 * WORD + extra)
    state = WORD if pieces_k == 1 else 2 * WORD
    per_neuron = {True: extra, False: WORD * scaled}     # k0 == 0 or not
    return [_Cut((k0, k1), (n0, n1), (k1 - k0) * (n1 - n0) * unit + per_neuron[k0 == 0] * (n1 - n0),
                 state * (n1 - n0))
            for n0, n1 in _ranges(n, pieces_n) for k0, k1 in _ranges(k, pieces_k)]


def _table_cuts(rows: int, width: int, unit: int, capacity: int) -> list[_Cut]:
    """By table rows first (a lookup reads one row, so a token touches one core); no accumulator."""
    pieces_n, pieces_k = _grid(width, rows, unit, capacity, 0, 0)
    return [_Cut((k0, k1), (n0, n1), (k1 - k0) * (n1 - n0) * unit, 0)
            for k0, k1 in _ranges(rows, pieces_k) for n0, n1 in _ranges(width, pieces_n)]


# Packing, traffic, layout -------------------------------------------------------------------------

@dataclasses.dataclass
class _Part:
    load: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    constants: set[str] = dataclasses.field(default_factory=set)  # names of the constants held


def _pack(graph: ir.Graph, cuts: dict[str, list[_Cut]], memory: dict[str, tuple[int, dict[str, int]]],
          capacity: int, state_load: dict[str, int] | None = None
          ) -> tuple[list[_Part], dict[str, list[tuple[_Cut, int]]], dict[str, int]]:
    """Next-fit in topological order: each tile or node joins the newest partition when it has
    room, else opens one. Returns the partitions, each tiled node's [(tile, partition)] and
    each other node's partition (tied Gathers and weight-path nodes come later). A step
    graph's state goes with the node that writes it (`state_load`: node -> bytes)."""
    state_load = state_load or {}
    parts: list[_Part] = []

    def fit(load: dict[str, int], constants: dict[str, int]) -> int:
        fresh = {c: size for c, size in constants.items() if not parts or c not in parts[-1].constants}
        if not parts or sum(parts[-1].load.values()) + sum(load.values()) + sum(fresh.values()) > capacity:
            parts.append(_Part())
            fresh = constants
        part = parts[-1]
        for category, size in load.items():
            part.load[category] = part.load.get(category, 0) + size
        part.load["constants"] += sum(fresh.values())
        part.constants.update(fresh)
        return len(parts) - 1

    homes: dict[str, list[tuple[_Cut, int]]] = {}
    op_part: dict[str, int] = {}
    for node in graph:
        state = {STEP_STATE: state_load[node.name]} if node.name in state_load else {}
        if node.name in cuts:   # a state written by a tiled node sits with its first tile
            homes[node.name] = [(cut, fit({"weights": cut.weight_bytes, "states": cut.state_bytes} | (state if i == 0 else {}),
                                          {}))
                                for i, cut in enumerate(cuts[node.name])]
        elif node.name in memory:
            kv, constants = memory[node.name]
            op_part[node.name] = fit({"kv": kv} | state, constants)
    return parts, homes, op_part


def _traffic(graph: ir.Graph, count: int, homes: dict[str, list[tuple[_Cut, int]]], op_part: dict[str, int],
             found: _Tiled) -> nx.DiGraph:
    """The traffic graph over partitions 0..count-1. A multicast flow is a node of its own
    (a hyperedge) keyed (source, destinations), linked from its source and to each destination,
    with the per-token bytes it carries. A tensor goes once from each producing partition to
    every other partition that reads it: the whole tensor from a node, each tile's output
    slice from a tiled node (from a table tile, in proportion to its share of the token ids).
    Constants are local; graph inputs and outputs are the host's."""
    parts_of = {name: sorted({part for _, part in tiles}) for name, tiles in homes.items()}
    parts_of |= {name: [part] for name, part in op_part.items()}
    carried: dict[tuple[int, tuple[int, ...]], int] = {}
    for node in graph:
        if node.name not in parts_of:
            continue  # a weight-path node: its outputs are constants
        for value in node.outputs:
            if const_root(value) is not None:
                continue
            readers = sorted({part for user, _ in value.uses() if user.graph is graph for part in parts_of[user.name]})
            if not readers:
                continue
            if node.name not in homes:
                sends = [(op_part[node.name], _per_position(value, found.widths))]
            elif node.name in found.tables:
                rows = found.tables[node.name][0]
                sends = [(part, math.ceil((cut.n[1] - cut.n[0]) * (cut.k[1] - cut.k[0]) / rows))
                         for cut, part in homes[node.name]]
            else:
                sends = [(part, cut.n[1] - cut.n[0]) for cut, part in homes[node.name]]
            for src, elements in sends:
                dests = tuple(d for d in readers if d != src)
                if dests:
                    carried[(src, dests)] = carried.get((src, dests), 0) + elements * WORD
    traffic = nx.DiGraph()
    traffic.add_nodes_from(range(count))
    for flow, size in carried.items():
        traffic.add_node(flow, bytes=size)
        traffic.add_edge(flow[0], flow)
        traffic.add_edges_from((flow, dest) for dest in flow[1])
    return traffic


def byte_hops(mesh: Mesh, cores: list[int], traffic: nx.DiGraph) -> int:
    """Per-token sum over flows of bytes x links of its XY multicast tree, partitions on `cores`."""
    return sum(size * mesh.multicast_links(cores[src], [cores[d] for d in dests])
               for (src, dests), size in _flows(traffic))


def _flows(traffic: nx.DiGraph) -> list[tuple[tuple[int, tuple[int, ...]], int]]:
    return [(flow, size) for flow, size in traffic.nodes(data="bytes") if size is not None]


def _improve(mesh: Mesh, start: list[int], traffic: nx.DiGraph) -> tuple[list[int], int, int]:
    """Pairwise swaps (a partition with the occupant of a core within RADIUS, or an empty
    core) kept only when they lower the byte-hops of the flows they touch: the total never
    grows. Sweeps the partitions in order; stops after a sweep without a gain, SWEEPS sweeps
    or BUDGET flow evaluations. Returns (cores, swaps kept, evaluations)."""
    flows = _flows(traffic)
    index = {flow: i for i, (flow, _) in enumerate(flows)}
    incident = [[index[f] for f in traffic.successors(p)] + [index[f] for f in traffic.predecessors(p)]
                for p in range(len(start))]
    cores, occupant = list(start), [-1] * mesh.cores
    for part, core in enumerate(cores):
        occupant[core] = part

    def cost(i: int) -> int:
        (src, dests), size = flows[i]
        return size * mesh.multicast_links(cores[src], [cores[d] for d in dests])

    costs = [cost(i) for i in range(len(flows))]
    offsets = sorted(((dx, dy) for dx in range(-RADIUS, RADIUS + 1) for dy in range(-RADIUS, RADIUS + 1)
                      if 0 < abs(dx) + abs(dy) <= RADIUS), key=lambda o: (abs(o[0]) + abs(o[1]), o[1], o[0]))
    swaps = evaluations = 0
    for _ in range(SWEEPS):
        gained = False
        for a in range(len(cores)):
            for dx, dy in offsets:
                x, y = mesh.core_xy(cores[a])
                x, y = x + dx, y + dy
                if not (0 <= x < mesh.cols and 0 <= y < mesh.rows):
                    continue
                here, there = cores[a], y * mesh.cols + x
                b = occupant[there]
                touched = incident[a] if b < 0 else sorted(set(incident[a]) | set(incident[b]))
                cores[a], occupant[there], occupant[here] = there, a, b
                if b >= 0:
                    cores[b] = here
                after = [cost(i) for i in touched]
                evaluations += len(touched)
                if sum(after) < sum(costs[i] for i in touched):
                    for i, c in zip(touched, after):
                        costs[i] = c
                    swaps, gained = swaps + 1, True
                else:  # undo
                    cores[a], occupant[here], occupant[there] = here, a, b
                    if b >= 0:
                        cores[b] = there
                if evaluations >= BUDGET:
                    return cores, swaps, evaluations
        if not gained:
            break
    return cores, swaps, evaluations


# Report -----------------------------------------------------------------------------------------

def _report(placement: Placement, target: Target, capacity: int, found: _Tiled, traffic: nx.DiGraph,
            snake: list[int], cores: list[int], swaps: int, evaluations: int) -> dict:
    mesh = placement.mesh
    totals = placement.core_bytes()
    data_memory = target["core"]["data_memory_bytes"]
    per_site: dict[str, int] = {}
    split_k = set()
    for tile in placement.tiles:
        if tile.owner in found.sites:
            per_site[tile.owner] = per_site.get(tile.owner, 0) + 1
            if tile.k[1] - tile.k[0] < found.sites[tile.owner][0]:
                split_k.add(tile.owner)
    categories = CATEGORIES + ((STEP_STATE,) if placement.states else ())
    memory = {c: sum(m.get(c, 0) for m in placement.memory.values()) for c in categories}
    unit = placement.weight_bits // 8
    return ({"step_state": _state_report(placement)} if placement.states else {}) | {
        "target": placement.target,
        "cores_used": len(placement.cores_used),
        "cores_available": mesh.cores,
        "tiles": len(placement.tiles),
        "weight_bits": placement.weight_bits,
        "mesh": [mesh.rows, mesh.cols],
        "memory_bytes": memory | {"total": sum(memory.values())},
        "usable_bytes": {"per_core": capacity, "mesh": capacity * mesh.cores},
        "utilisation": {"max": round(max(totals.values(), default=0) / data_memory, 4),
                        "mean": round(sum(totals.values()) / max(len(totals), 1) / data_memory, 4)},
        "tiles_per_site": {"sites": len(per_site), "min": min(per_site.values(), default=0),
                           "max": max(per_site.values(), default=0), "split_by_k": sorted(split_k)},
        "traffic": {"bytes_per_token": sum(size for _, size in _flows(traffic)),
                    "flows": len(_flows(traffic)),
                    "byte_hops_snake": byte_hops(mesh, snake, traffic),
                    "byte_hops": byte_hops(mesh, cores, traffic),
                    "swaps": swaps, "evaluations": evaluations},
        "tied_weights": [{"gather": gather, "site": site, "bytes_saved": math.prod(found.tables[gather]) * unit}
                         for gather, site in found.tied.items()],
    }


def _state_report(placement: Placement) -> dict:
    """Where a step graph's state lives and how far a growing one fits."""
    fits = placement.fits_up_to()
    growing = [n for n in fits.values() if n is not None]
    return {"states": len(placement.states), "cores": sorted(fits),
            "bytes_at_start": sum(s.bytes for s in placement.states),
            "bytes_per_position": sum(s.bytes_per_position for s in placement.states),
            "reserved_positions": max((s.reserved_positions for s in placement.states), default=0),
            "fits_up_to_context": min(growing) if growing else None,
            "word_bytes": WORD}
