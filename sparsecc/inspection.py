"""`sparsecc inspect`: what a model or a compile output folder holds, without running it.

Reads the model (an .onnx file, or `model.onnx` of a compile output folder) and, when they
are there, the compile's `report.json` and the seneca backend's placement (`placement.json`,
or the placement the partition pass stored in the model). Everything is derived from the
graph (sparsecc.sites), the Threshold ops' t and those files; nothing is run.

Text output: one record per line, a kind word then `key=value` fields (values with spaces
quoted as JSON strings), so `grep '^site '` and `grep 'threshold=-'` work:

    model path=out/model.onnx opset=18 nodes=231 weight_bytes=3984384
    sites count=15 groups=9 thresholds=8 heads=1 natural=0 factors=0 macs_body=... macs_all=...
    site index=0 label="layer 0 q" name=node_linear layer=0 op=MatMul shape=128x128 macs=16384 group=0 ...

A site's *layer* and *label* (`layer 3 q`, `head`) are found from structure
(sparsecc.site_names): the recurrence of group roles gives the layer, the data flow between
sites their role in it. With no repeated layers (an irregular model, or one layer) no layer
is given.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.errors import SparseccError
from sparsecc.model_io import MODEL_FILE, load_model, model_file
from sparsecc.site_names import ranges, site_labels, site_layers
from sparsecc.sites import analyze

SCHEMA = "sparsecc.inspect/1"
REPORT, PLACEMENT = "report.json", "placement.json"


def inspect_path(path: str | Path) -> dict[str, Any]:
    """Everything `sparsecc inspect PATH` shows, as plain JSON values."""
    path = Path(path)
    model_path = model_file(path)
    model = load_model(model_path)
    # a compile output: the report beside its model.onnx (eval reads config.yaml beside it the same way)
    report = _read_json(model_path.parent / REPORT) if model_path.name == MODEL_FILE else None
    if report is not None and report.get("kind") != "compile":
        report = None
    placement = _placement(model, model_path.parent / PLACEMENT if path.is_dir() else None)
    return describe(model, str(path), report, placement)


def describe(model: ir.Model, path: str, report: dict | None = None, placement: dict | None = None) -> dict[str, Any]:
    """The inspect document of an in-memory model, with its compile report and placement JSON."""
    from sparsecc.backends.seneca.placement import Placement

    analysis = analyze(model.graph)
    sites = analysis.sites
    thresholds = {n.name: n for n in model.graph if ops.is_threshold(n)}
    layer = site_layers(sites)
    labels = site_labels(model.graph, analysis)
    calibrated, setter = calibrated_sparsity(report, list(thresholds)) if report else ({}, None)
    cores = Placement.from_json(json.dumps(placement)).node_cores() if placement else {}
    weight_types = {s.weight: _dtype_name(model.graph, s.weight) for s in sites}
    rows = []
    for s in sites:
        row: dict[str, Any] = {
            "index": s.index, "label": labels[s.index], "name": s.node, "layer": layer.get(s.index), "op": s.op,
            "in_features": s.in_features, "out_features": s.out_features, "macs_per_token": s.macs_per_token,
            "group": s.group, "head": s.head, "natural": s.natural, "tensor": s.source,
            "weight": s.weight, "weight_dtype": weight_types[s.weight],
            "compensates": s.compensates, "factor": s.factor, "threshold": s.threshold,
            "t": None, "calibrated_sparsity": calibrated.get(s.threshold),
        }
        if s.threshold is not None and s.threshold in thresholds:
            row |= threshold_values(thresholds[s.threshold])
        if placement:
            row["cores"] = cores.get(s.node, [])
        rows.append(row)
    body = [s for s in sites if not s.head and s.compensates is None]
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "path": path,
        "model": {"opset": model.opset_imports.get("", 0), "nodes": len(model.graph),
                  "inputs": [v.name for v in model.graph.inputs], "outputs": [v.name for v in model.graph.outputs],
                  "weight_bytes": sum(v.const_value.nbytes for v in model.graph.initializers.values()
                                      if v.const_value is not None)},
        "summary": {"sites": len(sites), "groups": len(analysis.groups()), "thresholds": len(thresholds),
                    "heads": sum(s.head for s in sites), "natural": sum(bool(s.natural) for s in sites),
                    "factors": sum(s.compensates is not None for s in sites),
                    "layers": max(layer.values()) + 1 if layer else None,
                    "attention_products": analysis.attention_products,
                    "macs_per_token": {"body": sum(s.macs_per_token for s in body),
                                       "all": sum(s.macs_per_token for s in sites if s.compensates is None)}},
        "declined": analysis.declined,
        "sites": rows,
    }
    if report is not None:
        doc["compile"] = _compile_summary(report, setter)
    if placement:
        doc["placement"] = _placement_summary(placement)
    step = _step_graph(model, placement)
    if step is not None:
        doc["step_graph"] = step
    return doc


def threshold_values(node: ir.Node) -> dict[str, Any]:
    """A Threshold's t: a scalar, or per channel (min/max, and the score level tau of a
    weight-aware threshold)."""
    tensor = node.inputs[1].const_value
    if tensor is None:   # t fed at run time (only while a search runs)
        return {"t": None}
    t = np.asarray(tensor.numpy(), np.float64)
    if t.ndim == 0:
        return {"t": float(t)}
    out: dict[str, Any] = {"t": "per-channel", "channels": int(t.size), "t_min": float(t.min()), "t_max": float(t.max())}
    if ops.score_scale(node) is not None:
        out["tau"] = ops.threshold_level(node)
    return out


def calibrated_sparsity(report: dict, threshold_order: list[str]) -> tuple[dict[str, float], str | None]:
    """Threshold name -> the sparsity the last pass that set it reported on the calibration
    data, and that pass's id. Passes report it in their own words: calibrate-thresholds
    `calibrated_sparsity`, finetune-bands `sparsity_after`, greedy-blocks `level`,
    allocate-sparsity its group's `sparsity`, sequential-search the accepted `level` of each
    threshold, named by its position in graph order."""
    found: dict[str, float] = {}
    setter = None
    for p in report.get("passes", []):
        details = p.get("details") or {}
        got: dict[str, float] = {}
        rows = details.get("thresholds")
        if isinstance(rows, list):
            groups = {g.get("group"): g.get("sparsity") for g in details.get("groups", []) if isinstance(g, dict)}
            for row in rows:
                if not isinstance(row, dict) or "threshold" not in row:
                    continue
                value = next((row[k] for k in ("calibrated_sparsity", "sparsity_after", "level") if k in row),
                             groups.get(row.get("group")))
                if isinstance(value, (int, float)):
                    got[row["threshold"]] = float(value)
        if p.get("pass") == "sequential-search":
            for step in details.get("history", []):
                position = str(step.get("threshold", "")).split(":", 1)[0]
                if position.isdigit() and int(position) < len(threshold_order):
                    got[threshold_order[int(position)]] = float(step["level"])
        if got:
            found |= got
            setter = p.get("id")
    return found, setter


def _compile_summary(report: dict, setter: str | None) -> dict[str, Any]:
    target = report.get("target") or {}
    out: dict[str, Any] = {"source": (report.get("source") or {}).get("model"), "backend": target.get("backend"),
                           "declined": target.get("declined") or {},
                           "passes": [p.get("id") for p in report.get("passes", [])], "set_by": setter}
    details = next((p.get("details") or {} for p in report.get("passes", []) if p.get("id") == setter), {})
    for key in ("target", "calibrated_model_sparsity"):
        if key in details:
            out[key] = details[key]
    return out


def _placement(model: ir.Model, beside: Path | None) -> dict | None:
    """The placement JSON: placement.json of the folder, else the one stored in the model."""
    from sparsecc.backends.seneca.placement import METADATA_KEY

    if beside is not None and beside.is_file():
        return _read_json(beside)
    text = model.metadata_props.get(METADATA_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise SparseccError(f"the model's {METADATA_KEY!r} metadata is not valid JSON; re-run the partition pass") from None


def _placement_summary(doc: dict) -> dict[str, Any]:
    from sparsecc.backends.seneca.placement import Placement

    p = Placement.from_json(json.dumps(doc))
    return {"target": p.target, "rows": p.rows, "cols": p.cols, "weight_bits": p.weight_bits,
            "cores_used": len(p.cores_used), "tiles": len(p.tiles),
            "bytes_max": max(p.core_bytes().values(), default=0)}


def _step_graph(model: ir.Model, placement: dict | None) -> dict | None:
    from sparsecc.stepgraph import is_step_graph, read_spec, state_input, state_output

    if not is_step_graph(model):
        return None
    spec = read_spec(model)
    placed = {s.get("input"): s.get("core") for s in (placement or {}).get("states", []) if isinstance(s, dict)}
    states = []
    for i, s in enumerate(spec.states):
        row = {"index": i, "input": state_input(i), "output": state_output(i), "role": s.role,
               "shape": list(s.shape), "dtype": s.dtype, "grows": s.grow_axis is not None}
        if placed:
            row["core"] = placed.get(state_input(i))
        states.append(row)
    return {"arch": spec.arch, "states": states, "state_bytes": spec.state_bytes(0),
            "grows": any(s.grow_axis is not None for s in spec.states)}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SparseccError(f"{path} is not valid JSON; re-run the command that wrote it or remove it") from None
    if not isinstance(doc, dict):
        raise SparseccError(f"{path} is not a JSON object; re-run the command that wrote it or remove it")
    return doc


def _dtype_name(graph: ir.Graph, name: str) -> str | None:
    value = graph.initializers.get(name)
    if value is None or value.const_value is None:
        return None
    return value.const_value.dtype.name.lower()


# ---- text -----------------------------------------------------------------------------------

def to_text(doc: dict[str, Any]) -> str:
    """The inspect document as lines of `kind key=value ...`."""
    s, m = doc["summary"], doc["model"]
    lines = [_line("model", path=doc["path"], opset=m["opset"], nodes=m["nodes"], weight_bytes=m["weight_bytes"])]
    lines.append(_line("sites", count=s["sites"], groups=s["groups"], thresholds=s["thresholds"], heads=s["heads"],
                       natural=s["natural"], factors=s["factors"], layers=s["layers"],
                       macs_body=s["macs_per_token"]["body"], macs_all=s["macs_per_token"]["all"],
                       attention_products=s["attention_products"]))
    if "compile" in doc:
        c = doc["compile"]
        lines.append(_line("compile", source=c["source"], backend=c["backend"], passes=",".join(map(str, c["passes"])),
                           set_by=c["set_by"], target=c.get("target"),
                           model_sparsity=c.get("calibrated_model_sparsity"), declined=len(c["declined"])))
        lines += [_line("backend-declined", node=name, reason=why) for name, why in c["declined"].items()]
    if "placement" in doc:
        p = doc["placement"]
        lines.append(_line("placement", target=p["target"], mesh=f"{p['rows']}x{p['cols']}", cores_used=p["cores_used"],
                           tiles=p["tiles"], weight_bits=p["weight_bits"], bytes_max=p["bytes_max"]))
    if "step_graph" in doc:
        g = doc["step_graph"]
        lines.append(_line("step-graph", arch=g["arch"], states=len(g["states"]), state_bytes=g["state_bytes"],
                           grows="yes" if g["grows"] else "no"))
        for st in g["states"]:
            lines.append(_line("state", index=st["index"], input=st["input"], output=st["output"],
                               shape="x".join(map(str, st["shape"])), dtype=st["dtype"], core=st.get("core"),
                               role=st["role"]))
    lines += [_line("declined", node=d["node"], reason=d["reason"]) for d in doc["declined"]]
    for r in doc["sites"]:
        fields: dict[str, Any] = {
            "index": r["index"], "label": r["label"], "name": r["name"], "layer": r["layer"], "op": r["op"],
            "shape": f"{r['in_features']}x{r['out_features']}", "macs": r["macs_per_token"], "group": r["group"],
            "head": "yes" if r["head"] else "no", "natural": r["natural"] or "-", "weight": r["weight_dtype"],
            "threshold": r["threshold"] or "-", "t": _t(r),
        }
        if r.get("t") == "per-channel":
            fields |= {"t_min": _num(r["t_min"]), "t_max": _num(r["t_max"]), "tau": _num(r.get("tau"))}
        if r["compensates"] is not None:
            fields |= {"compensates": r["compensates"], "factor": r["factor"]}
        fields["calib"] = _num(r.get("calibrated_sparsity"))
        if "cores" in r:
            fields["cores"] = ranges(r["cores"]) or "-"
        lines.append(_line("site", **fields))
    return "\n".join(lines) + "\n"


def _line(kind: str, **fields: Any) -> str:
    """`kind k=v ...`; fields whose value is None are left out."""
    return " ".join([kind] + [f"{k}={_value(v)}" for k, v in fields.items() if v is not None])


def _value(v: Any) -> str:
    text = _num(v) if isinstance(v, float) else str(v)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def _num(v: float | None) -> str | None:
    return None if v is None else f"{v:.6g}"


def _t(row: dict) -> str:
    if row["threshold"] is None:
        return "-"
    t = row.get("t")
    return "unset" if t is None else (t if isinstance(t, str) else _num(t))
