"""Names for people of every linear site, threshold and threshold group, from graph structure.

A site's name is its layer and its role in it, e.g. `layer 3 q`, `layer 3 down`, `head`;
a threshold or group is named by the sites it feeds (`layer 3 q/k/v`, `layers 0-3 gate/up`).
Node names are never read. The reports keep their ids (node names, shapes) beside these.

*Layers* recur: the groups' roles (the shapes of the sites reading one tensor) recur once or
a few times per layer, so with L the greatest common divisor of the roles' counts, a role's
k-th group in graph order sits in layer k * L // count. With L = 1 (an irregular model, or one
layer) no layer is given, and names have no layer part.

*Roles*, from the data flow between sites and the activation x activation MatMuls
("products", sparsecc.sites), first that applies:
- `head`: a head (sparsecc.sites);
- attention inputs, whose output reaches products before any site: a *score* product is one
  whose output passes a Softmax into another product's left operand, the *value* product;
  reaching the score product's left operand makes `q`, its right `k`, the value product's
  right `v`, all three (one fused projection) `qkv`;
- `o`: its input is computed from a product, or from sites of several groups all in its own
  layer (a recurrent mixer's output: not the residual stream, which reaches earlier layers);
- `down`: its input is computed from the sites of one group only (through the activation);
- `up`, or `gate` and `up` for a pair: a group that a `down` reads; `gate` is the one whose
  way to it passes a nonlinearity (`up` is multiplied in as it is);
- anything else is `site j`, j its position in its layer (in the model, without layers).
A compensation factor (compensate-lowrank) is named after the site it compensates (the one
its factor 2 is added to), e.g. `layer 3 down factor 1`. Names that would repeat get ` #2`,
` #3` in graph order.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable

import onnx_ir as ir

from sparsecc import ops
from sparsecc.sites import Analysis, Site, analyze, const_root, quantizer_of

# the order roles are listed in within a layer
_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
# ops that only move, scale or add values: passing them is no nonlinearity (a gate's is)
_LINEAR = {"Add", "Sub", "Mul", "Div", "Neg", "Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze",
           "Flatten", "Concat", "Split", "Slice", "Gather", "Expand", "Tile", "Pad", "DequantizeLinear",
           "QuantizeLinear", "Threshold"}
_NO_DATA = {"Shape", "Size"}   # their outputs carry a tensor's shape, not its values


@dataclasses.dataclass(frozen=True)
class Name:
    layer: int | None
    role: str

    def __str__(self) -> str:
        return label([self])


def label(names: Iterable[Name]) -> str:
    """One label for the sites named `names`: `layer 3 q/k/v`, `layers 0-3 o`, `head`."""
    names = list(dict.fromkeys(names))
    roles = sorted(dict.fromkeys(n.role for n in names), key=_role_key)
    known = [r for r in roles if _site_number(r) < 0]
    positions = [r.removeprefix("site ") for r in roles if _site_number(r) >= 0]
    role = "/".join(known + (["site " + "/".join(positions)] if positions else []))
    return " ".join(part for part in (layers_label(names), role) if part)


def layers_label(names: Iterable[Name]) -> str:
    """The layers part of a label: `layer 3`, `layers 0-3`, or "" (no layers)."""
    layers = sorted({n.layer for n in names if n.layer is not None})
    if not layers:
        return ""
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {ranges(layers)}"


def site_names(graph: ir.Graph, analysis: Analysis | None = None) -> dict[int, Name]:
    """Site index -> its name (module docstring)."""
    analysis = analysis or analyze(graph)
    sites = analysis.sites
    layers = site_layers(sites)
    roles = _Roles(graph, analysis, layers).roles()
    position: dict = collections.Counter()
    out: dict[int, Name] = {}
    for s in sites:
        if s.compensates is not None:
            continue
        layer = layers.get(s.index)
        role = roles.get(s.index) or f"site {position[layer]}"   # its position among the layer's (model's) sites
        position[layer] += 1
        out[s.index] = Name(layer, role)
    _number_repeats(out)
    fed = collections.defaultdict(list)
    for s in sites:
        if s.threshold is not None and s.index in out:
            fed[s.threshold].append(out[s.index])
    pairs = _compensated_sites(analysis)
    factors = {}
    for s in sites:
        if s.compensates is not None:   # after the site it compensates, else the sites of its threshold
            of = [out[pairs[s.index]]] if s.index in pairs else fed.get(s.compensates, [])
            layer = of[0].layer if of and len({n.layer for n in of}) == 1 else None
            factors[s.index] = Name(layer, f"{label(Name(None, n.role) for n in of) or 'site'} factor {s.factor}")
    _number_repeats(factors)
    return dict(sorted((out | factors).items()))


def _number_repeats(names: dict[int, Name]) -> None:
    """Names that would repeat get #2, #3 in graph order."""
    seen: dict = collections.Counter()
    for index in sorted(names):
        name = names[index]
        seen[name] += 1
        if seen[name] > 1:
            names[index] = Name(name.layer, f"{name.role} #{seen[name]}")


def _compensated_sites(analysis: Analysis) -> dict[int, int]:
    """Compensation factor -> the site it compensates: factor 2's output is added to that
    site's output, and factor 1 feeds factor 2 (sparsecc.sites)."""
    index = {id(node): s for s, node in zip(analysis.sites, analysis.nodes)}
    out = {}
    for s, node in zip(analysis.sites, analysis.nodes):
        if s.factor != 2:
            continue
        for user, slot in node.outputs[0].uses():
            other = user.inputs[1 - slot] if user.op_type == "Add" and len(user.inputs) == 2 else None
            site = index.get(id(other.producer())) if other is not None and other.producer() is not None else None
            if site is not None and site.compensates is None:
                out[s.index] = site.index
                value = node.inputs[0]
                quantizer = quantizer_of(value)
                first = index.get(id((quantizer.inputs[0] if quantizer is not None else value).producer()))
                if first is not None and first.factor == 1:
                    out[first.index] = site.index
    return out


def site_labels(graph: ir.Graph, analysis: Analysis | None = None) -> dict[int, str]:
    """Site index -> label, e.g. `layer 3 q`."""
    return {i: str(n) for i, n in site_names(graph, analysis).items()}


def threshold_names(graph: ir.Graph, analysis: Analysis | None = None) -> dict[str, list[Name]]:
    """Threshold node name -> the names of the sites it feeds (graph order; none for a
    Threshold that feeds no site)."""
    analysis = analysis or analyze(graph)
    names = site_names(graph, analysis)
    out: dict[str, list[Name]] = {n.name: [] for n in graph if ops.is_threshold(n)}
    for s in analysis.sites:
        if s.threshold in out and s.compensates is None:
            out[s.threshold].append(names[s.index])
    return out


def threshold_labels(graph: ir.Graph, analysis: Analysis | None = None) -> dict[str, str]:
    """Threshold node name -> label of the sites it feeds, e.g. `layer 3 q/k/v`."""
    return {t: label(names) for t, names in threshold_names(graph, analysis).items()}


def site_layers(sites: list[Site]) -> dict[int, int]:
    """Site index -> layer, from the recurrence of group roles (module docstring); {} when the
    model shows no repeated structure. Heads have no layer; a compensation factor is in the
    layer of the sites whose threshold it compensates."""
    groups: dict[int, list[Site]] = {}
    for s in sites:
        if s.compensates is None and not s.head:
            groups.setdefault(s.group, []).append(s)
    roles = {g: tuple(sorted((s.in_features, s.out_features) for s in members)) for g, members in groups.items()}
    count: dict[tuple, int] = {}
    for role in roles.values():
        count[role] = count.get(role, 0) + 1
    period = math.gcd(*count.values()) if count else 0
    if period < 2:
        return {}
    seen: dict[tuple, int] = {}
    out: dict[int, int] = {}
    for g in sorted(groups, key=lambda g: groups[g][0].index):   # graph order
        k = seen[roles[g]] = seen.get(roles[g], -1) + 1
        for s in groups[g]:
            out[s.index] = k * period // count[roles[g]]
    by_threshold = {s.threshold: out[s.index] for s in sites if s.threshold and s.index in out}
    for s in sites:
        if s.compensates in by_threshold:
            out[s.index] = by_threshold[s.compensates]
    return out


def node_layers(graph: ir.Graph, analysis: Analysis | None = None) -> dict[str, int | None]:
    """Every node's name -> its layer (None: in no layer), from the site layers (`site_layers`)
    and the data flow alone. A site is in its own layer. A node that reads a site's output is
    in the layer of the latest site its value comes from (the ops right after a projection,
    the residual Adds after o and down); any other node in the layer of the sites its value
    reaches first (the nearest sites downstream) when those are all in one layer or all in
    none (a norm before q/k/v, attention before o, the final norm before the head), else in
    the layer of the latest site upstream (the residual stream, which reaches every later
    layer; tables and masks shared by all layers come from no site: no layer)."""
    analysis = analysis or analyze(graph)
    layers = site_layers(analysis.sites)
    site_layer = {node.name: layers.get(s.index) for s, node in zip(analysis.sites, analysis.nodes)}
    nodes = list(graph)
    up: dict[str, int | None] = {}        # the latest site layer upstream
    reads_site = set()
    for node in nodes:
        if node.name in site_layer:
            up[node.name] = site_layer[node.name]
            continue
        producers = [v.producer().name for v in node.inputs if v is not None and v.producer() is not None]
        found = [up[p] for p in producers if up[p] is not None]
        up[node.name] = max(found) if found else None
        if any(p in site_layer for p in producers):
            reads_site.add(node.name)
    down: dict[str, frozenset] = {}       # the layers of the nearest sites downstream (None: a layer-less site)
    for node in reversed(nodes):
        reached: set = set()
        for v in node.outputs:
            for user, _ in v.uses():
                reached |= {site_layer[user.name]} if user.name in site_layer else down.get(user.name, frozenset())
        down[node.name] = frozenset(reached)
    return {node.name: site_layer[node.name] if node.name in site_layer
            else next(iter(down[node.name])) if len(down[node.name]) == 1 and node.name not in reads_site
            else up[node.name] for node in nodes}


class _Roles:
    """The role words of a graph's sites (module docstring), from walks through the data flow
    that stop at sites and products."""

    def __init__(self, graph: ir.Graph, analysis: Analysis, layers: dict[int, int]):
        self.analysis, self.layers = analysis, layers
        self.node_site = {id(node): site for site, node in zip(analysis.sites, analysis.nodes)}
        self.products = [n for n in graph if n.domain == "" and n.op_type in ("MatMul", "Gemm")
                         and id(n) not in self.node_site and not _constant(n.inputs[0]) and not _constant(n.inputs[1])]
        self.product_ids = {id(n) for n in self.products}
        self.value_products = {id(p) for score in self.products
                               for p, slot, seen in self._downstream(score.outputs[0])
                               if p is not None and id(p) in self.product_ids and slot == 0 and "Softmax" in seen}
        self.score_products = {id(score) for score in self.products
                               if any(p is not None and id(p) in self.value_products and slot == 0 and "Softmax" in seen
                                      for p, slot, seen in self._downstream(score.outputs[0]))}

    def roles(self) -> dict[int, str]:
        roles: dict[int, str] = {}
        sites = [s for s in self.analysis.sites if s.compensates is None]
        node_of = {s.index: n for s, n in zip(self.analysis.sites, self.analysis.nodes)}
        readers: dict[int, list[Site]] = collections.defaultdict(list)   # group -> the downs reading only it
        for s in sites:
            if s.head:
                roles[s.index] = "head"
                continue
            reached = self._downstream(node_of[s.index].outputs[0])
            if any(p is not None and id(p) in self.product_ids for p, _, _ in reached):
                qkv = self._attention_input(reached)
                if qkv:
                    roles[s.index] = qkv
                continue
            upstream = self._upstream(node_of[s.index].inputs[0])
            if any(id(n) in self.product_ids for n in upstream if n is not None):
                roles[s.index] = "o"
                continue
            from_sites = [self.node_site[id(n)] for n in upstream if n is not None]
            groups = {u.group for u in from_sites}
            if len(groups) == 1 and None not in upstream:
                roles[s.index] = "down"
                readers[groups.pop()].append(s)
            elif len(groups) > 1 and {self.layers.get(u.index) for u in from_sites} == {self.layers.get(s.index, -1)}:
                roles[s.index] = "o"   # mixes several projections of its own layer (and state), not the residual
        for group, downs in readers.items():
            members = [s for s in sites if s.group == group and s.index not in roles]
            if not members or len(members) != len(self.analysis.groups()[members[0].source]):
                continue
            if len(members) == 1:
                roles[members[0].index] = "up"
            elif len(members) == 2:
                gated = [any(seen for p, _, seen in self._downstream(node_of[m.index].outputs[0])
                             if p is not None and self.node_site.get(id(p)) in downs) for m in members]
                if gated.count(True) == 1:
                    for m, g in zip(members, gated):
                        roles[m.index] = "gate" if g else "up"
        return roles

    def _attention_input(self, reached) -> str | None:
        """q, k, v (or a fused qkv, kv, ...) from where a site's output enters the products."""
        letters = set()
        for node, slot, _ in reached:
            if node is None:   # a graph output (a KV cache): no role
                continue
            if id(node) not in self.product_ids:
                return None   # also feeds a site: no attention projection
            if id(node) in self.score_products:
                letters.add("q" if slot == 0 else "k")
            elif id(node) in self.value_products and slot == 1:
                letters.add("v")
            else:
                return None
        return "".join(c for c in "qkv" if c in letters) or None

    def _downstream(self, value: ir.Value) -> list[tuple[ir.Node | None, int, frozenset]]:
        """(site or product reached, its input slot, the nonlinear op types passed on the way)
        from `value` forward; (None, -1, ...) for a graph output."""
        out, seen, stack = [], set(), [(value, frozenset())]
        while stack:
            v, passed = stack.pop()
            if (id(v), passed) in seen:
                continue
            seen.add((id(v), passed))
            if v.is_graph_output():
                out.append((None, -1, passed))
            for user, slot in v.uses():
                if id(user) in self.node_site or id(user) in self.product_ids:
                    out.append((user, slot, passed))
                    continue
                if user.op_type in _NO_DATA:
                    continue
                kept = passed if user.op_type in _LINEAR else passed | {user.op_type}
                stack.extend((o, kept) for o in user.outputs)
        return out

    def _upstream(self, value: ir.Value) -> set[ir.Node | None]:
        """The sites and products `value` is computed from (stopping at them), None for a graph
        input; compensation factors are left out (they add to what their site computes)."""
        out, seen, stack = set(), set(), [value]
        while stack:
            v = stack.pop()
            if v is None or id(v) in seen or _constant(v):
                continue
            seen.add(id(v))
            node = v.producer()
            if node is None:
                out.add(None)
                continue
            site = self.node_site.get(id(node))
            if site is not None and site.compensates is not None:
                continue
            if site is not None or id(node) in self.product_ids:
                out.add(node)
                continue
            if node.op_type not in _NO_DATA:
                stack.extend(node.inputs)
        return out


def _constant(value: ir.Value | None) -> bool:
    return value is None or const_root(value) is not None


def _role_key(role: str) -> tuple:
    base = role.split(" ")[0]
    return (_ORDER.index(base), role) if base in _ORDER else (len(_ORDER), _site_number(role), role)


def _site_number(role: str) -> int:
    parts = role.split(" ")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "site" and parts[1].isdigit() else -1


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)
