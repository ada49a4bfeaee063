"""compensate-lowrank: the channels a threshold drops go through a rank-r factor of the same
weight (R-Sparse, ICLR 2025), so what the threshold zeroes is not simply lost.

For each thresholded site y = Threshold(x) @ W:
    d  = x - Threshold(x)          exactly the values the threshold zeroes (one per Threshold)
    y' = y + (d @ B) @ A           W ~= B @ A, the rank-r truncated SVD of W as it multiplies x
B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T: both factors of like magnitude (16-bit values on the
chip), each singular direction's sign fixed so that the same weight always gives the same
bytes. The factors do not depend on t: the pass runs after insert-thresholds and before the
thresholds are calibrated or searched, which then pay for the compensation's MACs out of the
model-wide budget (`sparsecc.compensation`: factor 1 costs the non-zeros of d x r, factor 2
r x out, dense).

With t = 0, d = 0 and the model computes what it did; with full rank (r = min(in, out)) it
computes the dense model's output at any t. Heads are not compensated (they stay as they are).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from threadpoolctl import threadpool_limits

from sparsecc import ops
from sparsecc.config import option
from sparsecc.model_io import add_initializer
from sparsecc.pass_manager import Context, Pass, PassResult, require
from sparsecc.sites import Site, activation_dtype, analyze, weight_array

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclasses.dataclass(frozen=True)
class CompensateLowrankConfig:
    rank: int = option(16, "rank r of each site's factor W ~= B @ A (truncated SVD); clamped to min(in, out)",
                       within="[1, inf)")


class CompensateLowrank(Pass):
    """Send what each threshold drops through a rank-r SVD factor of the site's weight (R-Sparse)."""

    name = "compensate-lowrank"
    needs = frozenset({"thresholds"})
    Config = CompensateLowrankConfig

    def check(self, model, ctx):
        require(any(ops.is_threshold(n) for n in model.graph),
                "compensate-lowrank found no Threshold ops: run insert-thresholds before it")

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        graph = model.graph
        analysis = analyze(graph)
        pairs = list(zip(analysis.sites, analysis.nodes))
        done = {s.compensates for s in analysis.sites if s.compensates is not None}
        taken = set(graph.initializers) | {n.name for n in graph} | {v.name for n in graph for v in n.outputs}
        rows, declined, thresholds, calibrated = [], [], 0, []
        for th in [n for n in graph if ops.is_threshold(n)]:
            chosen = []
            for site, node in [(s, n) for s, n in pairs if s.threshold == th.name]:
                reason = "already compensated" if th.name in done else _declines(site, node)
                if reason:
                    declined.append({"site": site.node, "reason": reason})
                else:
                    chosen.append((site, node))
            if not chosen:
                continue
            thresholds += 1
            if np.any(th.inputs[1].const_value.numpy() != 0):   # (t may be one per channel)
                calibrated.append(th.name)
            dropped = _dropped_part(graph, th, taken)
            for site, node in chosen:
                rows.append(self._compensate(graph, site, node, dropped, taken))
        report = {
            "rank": self.config.rank, "thresholds": thresholds, "sites": len(rows),
            "extra_macs_per_token": {"per_dropped_value": sum(r["macs_per_token"][0] for r in rows),
                                     "dense": sum(r["macs_per_token"][1] for r in rows)},
            "parameters_added": sum(r["parameters"] for r in rows),
            "compensated": rows, "declined": declined,
        }
        if calibrated:
            report["warning"] = (f"{len(calibrated)} thresholds already have t > 0: calibrate or search them again after "
                                 "this pass so the MAC budget counts the compensation")
        return PassResult(report, changed=bool(rows))

    def _compensate(self, graph: ir.Graph, site: Site, node: ir.Node, dropped: ir.Value, taken: set) -> dict:
        w = weight_array(node.inputs[1]).astype(np.float64)
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            w = w.T
        r = min(self.config.rank, site.in_features, site.out_features)
        b, a, error = lowrank_factors(w, r)
        dtype = dropped.dtype.numpy()
        base = node.name or f"site{site.index}"
        b_value = add_initializer(graph, _fresh(f"{base}.lowrank.B", taken), b.astype(dtype))
        a_value = add_initializer(graph, _fresh(f"{base}.lowrank.A", taken), a.astype(dtype))
        y = node.outputs[0]
        uses = list(y.uses())
        down = ir.node("MatMul", [dropped, b_value], name=_fresh(f"{base}.lowrank.down", taken))
        up = ir.node("MatMul", [down.outputs[0], a_value], name=_fresh(f"{base}.lowrank.up", taken))
        add = ir.node("Add", [y, up.outputs[0]], name=_fresh(f"{base}.lowrank.add", taken))
        for n, shape in ((down, _last(dropped.shape, r)), (up, y.shape), (add, y.shape)):
            n.outputs[0].name = _fresh(f"{n.name}.out", taken)
            n.outputs[0].dtype, n.outputs[0].shape = y.dtype or dropped.dtype, shape
        down.outputs[0].dtype = dropped.dtype
        graph.insert_after(node, [down, up, add])
        compensated = add.outputs[0]
        for user, index in uses:   # (y is no graph output: that would make the site a head)
            user.replace_input_with(index, compensated)
        return {"site": site.node, "threshold": site.threshold, "rank": r, "relative_error": round(error, 6),
                "macs_per_token": [site.in_features * r, r * site.out_features],
                "parameters": r * (site.in_features + site.out_features)}


def lowrank_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(B [in, r], A [r, out], ||W - B A||_F / ||W||_F): W's best rank-r approximation, split
    evenly (each factor carries sqrt of the singular values), float64.

    From the eigenvectors of the smaller Gram matrix (W W^T or W^T W) rather than an SVD:
    several times faster, and B A is the projection of W onto r singular directions, so at
    full rank it is W to rounding however the small singular values come out. Each
    direction's sign is fixed: its largest |entry| is positive."""
    left = w.shape[0] <= w.shape[1]
    # BLAS on one thread: on busy cores its threads only wait for each other in a small
    # eigendecomposition (measured 2.8 s with 2 threads, 0.28 s with 1, for 576 x 576)
    with threadpool_limits(limits=1, user_api="blas"):
        gram = w @ w.T if left else w.T @ w
        values, vectors = np.linalg.eigh(gram)
    values, vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    vectors = vectors * np.where(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(rank)] < 0, -1.0, 1.0)
    sigma = np.sqrt(np.maximum(values, 0.0))
    root = np.sqrt(np.where(sigma > 1e-12 * max(sigma.max(initial=0.0), 1e-300), sigma, 1.0))
    if left:    # W ~= U U^T W
        b, a = vectors * root, (vectors.T @ w) / root[:, None]
    else:       # W ~= W V V^T
        b, a = (w @ vectors) / root, root[:, None] * vectors.T
    norm = float(np.linalg.norm(w))
    return b, a, float(np.linalg.norm(w - b @ a)) / norm if norm > 0 else 0.0


def _declines(site: Site, node: ir.Node) -> str | None:
    """Why a thresholded site is not compensated, or None."""
    if site.head:
        return "a head stays as it is"
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0):
        return "Gemm with transA or alpha other than the default"
    if activation_dtype(node) not in _FLOATS:
        return f"activation type {activation_dtype(node)} is not a float type"
    return None


def _dropped_part(graph: ir.Graph, threshold: ir.Node, taken: set) -> ir.Value:
    """d = x - Threshold(x), computed right after the Threshold."""
    x = threshold.inputs[0]
    sub = ir.node("Sub", [x, threshold.outputs[0]], name=_fresh(f"{threshold.name}.dropped", taken))
    sub.outputs[0].name = _fresh(f"{sub.name}.out", taken)
    sub.outputs[0].dtype = x.dtype or threshold.inputs[1].dtype
    sub.outputs[0].shape = x.shape
    graph.insert_after(threshold, sub)
    return sub.outputs[0]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _last(shape: ir.Shape | None, width: int) -> ir.Shape | None:
    return None if shape is None else ir.Shape([*shape.dims[:-1], width])


def _fresh(name: str, taken: set) -> str:
    """`name`, or `name.N` when taken; reserved once returned."""
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}.{n}", n + 1
    taken.add(candidate)
    return candidate
