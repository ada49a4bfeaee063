"""sparsecc-stats: a sample third-party backend for sparsecc.

`lower` writes two files into the compile output folder: `stats.csv`, one row per linear
site of the compiled model (shape, dense MACs per token, group, head / naturally sparse,
the Threshold feeding it and its level), and `stats.json`, the totals. `declines` names
every node this backend cannot account for: ops outside the ONNX and sparsecc domains.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import onnx_ir as ir

from sparsecc import ops
from sparsecc.backends.base import Backend
from sparsecc.sites import analyze

COLUMNS = ("site", "op", "in_features", "out_features", "macs_per_token", "group", "head", "natural",
           "compensates", "threshold", "level", "per_channel")
KNOWN_DOMAINS = ("", "ai.onnx", ops.DOMAIN)


class StatsBackend(Backend):
    name = "stats"
    description = "per-site MACs and thresholds as stats.csv + stats.json (sample third-party backend)"

    def declines(self, model: ir.Model) -> dict[str, str]:
        return {node.name: f"{node.domain}::{node.op_type} is outside the ONNX and sparsecc domains; "
                           "stats cannot count its work"
                for node in model.graph if node.domain not in KNOWN_DOMAINS}

    def lower(self, model: ir.Model, out_dir: Path) -> dict:
        thresholds = {node.name: node for node in model.graph if ops.is_threshold(node)}
        rows = []
        for site in analyze(model.graph).sites:
            node = thresholds.get(site.threshold)
            rows.append({
                "site": site.node, "op": site.op, "in_features": site.in_features, "out_features": site.out_features,
                "macs_per_token": site.macs_per_token, "group": site.group, "head": site.head,
                "natural": site.natural or "", "compensates": site.compensates or "",
                "threshold": site.threshold or "",
                # the level the threshold passes set: t, or tau for a weight-aware (per-channel) threshold
                "level": ops.threshold_level(node) if node is not None else "",
                "per_channel": node is not None and ops.score_scale(node) is not None,
            })
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (out_dir / "stats.csv").write_text(text.getvalue(), encoding="utf-8")
        # low-rank compensation factors (compensate-lowrank) add work; the dense baseline is the model without them
        dense = [r for r in rows if not r["compensates"]]
        body = [r for r in dense if not r["head"]]
        totals = {
            "schema": "sparsecc-stats/1",
            "sites": len(rows),
            "thresholds": len(thresholds),
            "dense_macs_per_token": {"all": sum(r["macs_per_token"] for r in dense),
                                     "body": sum(r["macs_per_token"] for r in body)},
            "thresholded_macs_per_token": sum(r["macs_per_token"] for r in rows if r["threshold"]),
        }
        (out_dir / "stats.json").write_text(json.dumps(totals, indent=2) + "\n", encoding="utf-8")
        return {"files": ["stats.csv", "stats.json"], "sites": len(rows),
                "dense_macs_per_token": totals["dense_macs_per_token"]["all"]}
