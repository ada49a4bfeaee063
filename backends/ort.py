"""The `ort` backend: runs a compiled model in ONNX Runtime to measure accuracy and sparsity.

sparsecc ops are model-local functions with standard-op bodies, so ONNX Runtime runs every
stage of a compiled model as is; this backend therefore needs no artifacts of its own.
"""
from __future__ import annotations

import contextlib

import onnx_ir as ir

from sparsecc.backends.base import Backend
from sparsecc.data import FeedSource
from sparsecc.metrics import OutputError, Perplexity, Zeros
from sparsecc.progress import bar
from sparsecc.runtime import ort_session
from sparsecc.site_names import site_labels, site_layers
from sparsecc.sites import analyze


class OrtBackend(Backend):
    name = "ort"
    description = "ONNX Runtime (CPU): accuracy, perplexity and measured sparsity of a compiled model"

    def evaluate(self, model: ir.Model, source: FeedSource, reference: ir.Model | None = None) -> dict:
        """Perplexity (for token inputs with logits out), per-site sparsity and effective MACs
        measured on `source`, and output error against `reference` on the same feeds."""
        analysis = analyze(model.graph)
        sites = analysis.sites
        tensors = sorted({s.consumes for s in sites})
        output = model.graph.outputs[0].name
        zeros = {name: Zeros() for name in tensors}
        ppl, ref_ppl, error = Perplexity(), Perplexity(), OutputError()
        with contextlib.ExitStack() as stack:
            session = stack.enter_context(ort_session(model, tensors))
            ref_session = stack.enter_context(ort_session(reference)) if reference is not None else None
            inputs = [i.name for i in session.get_inputs()]
            for feed in bar(source.feeds(inputs), total=len(source), desc="evaluating"):
                logits, *acts = session.run([output, *tensors], feed)
                for name, act in zip(tensors, acts):
                    zeros[name].add(act)
                ids = feed.get("input_ids")
                is_lm = ids is not None and logits.ndim == 3 and logits.shape[1] == ids.shape[-1]
                if is_lm:
                    ppl.add(logits, ids)
                if ref_session is not None:
                    ref_logits = ref_session.run([ref_session.get_outputs()[0].name], feed)[0]
                    error.add(logits, ref_logits)
                    if is_lm:
                        ref_ppl.add(ref_logits, ids)
        rows = []
        layers, labels = site_layers(sites), site_labels(model.graph, analysis)
        for s in sites:
            sparsity = zeros[s.consumes].sparsity
            rows.append({"site": s.node, "label": labels[s.index], "layer": layers.get(s.index), "tensor": s.consumes, "group": s.group,
                         "head": s.head, "natural": s.natural,
                         "thresholded": s.threshold is not None, "compensates": s.compensates, "sparsity": sparsity,
                         "macs_per_token": s.macs_per_token,
                         "effective_macs_per_token": (1 - sparsity) * s.macs_per_token})
        result = {"windows": len(source), "sites": rows, "macs": _mac_summary(rows)}
        if ppl.tokens:
            result["perplexity"] = ppl.value
            result["tokens"] = ppl.tokens
        if reference is not None:
            result["output_error"] = error.to_dict()
            if ref_ppl.tokens:
                result["reference_perplexity"] = ref_ppl.value
        return result


def _mac_summary(rows: list[dict]) -> dict:
    """Dense vs effective MACs per token: over the body (sites that may be sparse: all but the
    heads) and over every linear site. Low-rank compensation factors add effective MACs, not
    dense ones: the baseline is the model without them."""
    def summary(selected):
        dense = sum(r["macs_per_token"] for r in selected if r["compensates"] is None)
        effective = sum(r["effective_macs_per_token"] for r in selected)
        return {"dense_per_token": dense, "effective_per_token": effective,
                "sparsity": 1 - effective / dense if dense else 0.0}

    return {"body": summary([r for r in rows if not r["head"]]), "all": summary(rows)}
