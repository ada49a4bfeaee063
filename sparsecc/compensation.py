"""What low-rank compensation (compensate-lowrank) costs, written once for every MAC budget.

A Threshold at sparsity s (the fraction of its input x with |x| <= t, exact zeros z included)
drops d = x - Threshold(x): non-zero exactly where 0 < |x| <= t, a fraction s - z of x. Each
site it feeds may carry that part through W ~= B @ A: factor 1 (d @ B, in x r) costs
(s - z) x in x r MACs per token (d's zeros send no event), factor 2 (r x out) is dense. So
the cost rises with the threshold's level: a model-wide budget must count it, and to meet a
target with compensation the thresholds go higher.
"""
from __future__ import annotations

import dataclasses

import onnx_ir as ir

from sparsecc.sites import Analysis, Site, quantizer_of


@dataclasses.dataclass(frozen=True)
class Compensation:
    """The compensation factors of one Threshold's sites, as MACs per token."""

    sparse_macs: int = 0   # factor 1: sum of in x r, paid per non-zero of d
    dense_macs: int = 0    # factor 2: sum of r x out, paid in full

    def macs(self, sparsity: float, zeros: float) -> float:
        """Effective MACs per token with the threshold at `sparsity`, its input `zeros` exactly zero."""
        return self.sparse_macs * max(sparsity - zeros, 0.0) + self.dense_macs


NONE = Compensation()


def by_threshold(sites: list[Site]) -> dict[str, Compensation]:
    """Threshold name -> the cost of the compensation of its sites (absent: none)."""
    sparse: dict[str, int] = {}
    dense: dict[str, int] = {}
    for s in sites:
        if s.compensates is not None:
            into = sparse if s.factor == 1 else dense
            into[s.compensates] = into.get(s.compensates, 0) + s.macs_per_token
    return {name: Compensation(sparse.get(name, 0), dense.get(name, 0)) for name in sorted(set(sparse) | set(dense))}


def nodes(analysis: Analysis) -> set[str]:
    """Names of every node doing compensation work: the Sub making d (and a quantizer on d),
    both factors, and the Add that puts the compensation onto the site's output."""
    out = set()
    for site, node in zip(analysis.sites, analysis.nodes):
        if site.compensates is None:
            continue
        out.add(node.name)
        value = node.inputs[0]
        quantizer = quantizer_of(value)
        if quantizer is not None:   # quantize-activations ran after: its pair is compensation work too
            out |= {value.producer().name, quantizer.name}
            value = quantizer.inputs[0]
        if site.factor == 1:
            out.add(value.producer().name)
        else:
            out |= {user.name for user, _ in node.outputs[0].uses() if _is_add(user)}
    return out


def _is_add(node: ir.Node) -> bool:
    return node.op_type == "Add" and node.domain == ""
