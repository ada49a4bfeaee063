"""discover-sites: find and report the linear sites (analysis only; the model is unchanged)."""
from __future__ import annotations

import onnx_ir as ir

from sparsecc.pass_manager import Context, Pass, PassResult
from sparsecc.sites import analyze


class DiscoverSites(Pass):
    """Find MatMul/Gemm sites with constant weights, their groups, heads and natural sparsity."""

    name = "discover-sites"

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        analysis = analyze(model.graph)
        sites = analysis.sites
        body = [s for s in sites if not s.head]
        return PassResult({
            "sites": len(sites),
            "groups": len(analysis.groups()),
            "heads": [s.node for s in sites if s.head],
            "natural": len([s for s in sites if s.natural]),
            "attention_products": analysis.attention_products,
            "declined": analysis.declined,
            "macs_per_token": {"all": sum(s.macs_per_token for s in sites),
                               "body": sum(s.macs_per_token for s in body)},
        }, changed=False)
