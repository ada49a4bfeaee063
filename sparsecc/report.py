"""Reports: a versioned `report.json` for machines and `report.md` for people.

Both are deterministic (no timestamps, no wall times): the same inputs give byte-identical
files. Timings go to `timings.json` beside them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SCHEMA = "sparsecc.report/1"


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=_plain) + "\n"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _macs(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def data_summary(data: dict | None) -> str:
    """One line for what a source (FeedSource.describe()) feeds: how many windows of how many, from which files."""
    if data is None:
        return "none"
    kind = data.get("kind")
    if kind == "text":
        files = data.get("files", [data["path"]])
        names = files[0] if len(files) == 1 else f"{len(files)} files: {', '.join(files)}"
        return f"{data['windows']} of {data.get('windows_available', data['windows'])} windows x {data['seq_len']} tokens of {names}"
    if kind == "npz":
        return f"{data['samples']} of {data.get('samples_available', data['samples'])} samples of {data['path']}"
    if kind == "sampled":
        return f"{data['windows']} windows x {data['seq_len']} tokens sampled from the model (temperature {data['temperature']})"
    if kind == "mixed":
        return " + ".join(data_summary(part) for part in data["parts"])
    return f"{kind} (windows given from Python)"


def compile_markdown(report: dict) -> str:
    lines = [f"# sparsecc compile: {Path(report['source']['model']).name}", "",
             f"Calibration data: {data_summary(report.get('data'))}", ""]
    lines += ["| pass | changed | summary |", "|---|---|---|"]
    for p in report["passes"]:
        d = p["details"]
        keys = [k for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
        lines.append(f"| {p['id']} | {'yes' if p['changed'] else 'no'} | "
                     + ", ".join(f"{k}={d[k]}" for k in keys[:6]) + " |")
    calib = next((p["details"] for p in report["passes"] if p["pass"] == "calibrate-thresholds"), None)
    if calib:
        lines += ["", f"Target {_pct(calib['target'])} ({calib['mode']}); calibrated model-wide sparsity "
                      f"{_pct(calib['calibrated_model_sparsity'])} at level {_pct(calib['level'])}.", "",
                  "| threshold | t | calibrated sparsity | nodes |", "|---|---|---|---|"]
        for row in calib["thresholds"]:
            lines.append(f"| {row['label']} | {row['t']:.4g} | {_pct(row['calibrated_sparsity'])} "
                         f"| {', '.join(row['sites'])} |")
        for row in calib["natural"]:
            lines.append(f"| {row['label']} (natural) | - | {_pct(row['sparsity'])} | {row['site']} |")
    for p in report["passes"]:
        lines += search_markdown(p)
    lines += _distill_markdown(report)
    declined = report.get("target", {}).get("declined") or {}
    if declined:
        lines += ["", f"Declined by the `{report['target']['backend']}` backend:", ""]
        lines += [f"- `{node}`: {reason}" for node, reason in sorted(declined.items())]
    lines += ["", "Measure accuracy and sparsity on held-out data with `sparsecc eval`.", ""]
    return "\n".join(lines)


def _distill_markdown(report: dict) -> list[str]:
    runs = [p["details"] for p in report["passes"] if p["pass"] == "distill"]
    if not runs:
        return []
    d = runs[-1]
    t, before, after = d["training"], d["held_out"]["before"], d["held_out"]["after"]
    lines = ["", "## distill", "", f"{t['tokens']:,} tokens ({t['steps']} steps, {t['windows']} training windows), "
             f"{t['trained_tensors']} tensors ({t['trained_parameters']:,} parameters) trained in "
             f"{t['training_seconds']:.0f} s on {t['device']}{' (bf16)' if t['bf16'] else ''}; "
             f"target {_pct(d['target'])}, calibrated model-wide sparsity {_pct(d['calibrated_model_sparsity'])}.", ""]
    if "ppl_student" in before:
        lines += [f"On {before['windows']} held-out calibration windows:", "",
                  "| | teacher | student | student, thresholds open | KL to teacher |", "|---|---|---|---|---|"]
        for name, h in (("before", before), ("after", after)):
            lines.append(f"| {name} | {h['ppl_teacher']:.3f} | {h['ppl_student']:.3f} | {h['ppl_student_open']:.3f} | "
                         f"{h['kl']:.4f} |")
    elif before:
        lines += [f"Squared error to the teacher on {before['windows']} held-out windows: "
                  f"{before['squared_error']:.4g} before, {after['squared_error']:.4g} after."]
    return lines


# A search's choices: what it set per group or threshold, and what that cost -----------------
def search_facts(p: dict) -> list[str]:
    """The loss, moves, forward passes and seconds of a search pass's report ([] for other passes)."""
    d, name = p["details"], p["pass"]
    if name in ("allocate-sparsity", "sequential-search", "greedy-blocks"):
        return _search_facts(d, name) + (["resumed from its checkpoint"] if d["search"]["resumed"] else [])
    if name == "finetune-bands":
        loss, t = d["loss"], d["training"]
        return [f"loss {loss['before']:.4g} -> {loss['after']:.4g} ({loss['kind']})", f"{t['steps']} steps",
                f"{t['forward_passes']} forward and {t['backward_passes']} backward passes", f"{t['seconds']:.1f} s"] + (
            [f"resumed at step {t['resumed_at']}"] if t["resumed_at"] else [])
    return []


def _search_facts(d: dict, name: str) -> list[str]:
    if name == "allocate-sparsity":
        loss, search = d["loss"], d["search"]
        return [f"loss {loss['dense']:.4g} dense -> {loss['allocated']:.4g} ({loss['kind']})",
                f"{search['moves']} moves", f"{search['forward_passes']} forward passes", f"{search['seconds']:.1f} s"]
    if name == "sequential-search":
        loss, search = d["loss"], d["search"]
        return [f"loss {loss['dense']:.4g} dense -> {loss['searched']:.4g} ({loss['kind']}, loss_inc {d['loss_inc']})",
                f"{search['thresholds']} thresholds", f"{search['forward_passes']} forward passes",
                f"{search['seconds']:.1f} s"]
    e, search = d["error_vs_uniform"], d["search"]   # greedy-blocks
    ratio = f"block error {e['mean_ratio']:.3g}x one uniform level" if e["mean_ratio"] is not None else "no block error"
    return [f"{ratio} ({e['blocks_at_or_below_uniform']} of {e['blocks']} blocks at or below)",
            f"{search['moves']} moves", f"{search['forward_passes']} forward passes ({search['model_passes']} "
            f"model, {search['block_passes']} block)", f"{search['seconds']:.1f} s"]


def search_levels(p: dict) -> list[tuple[str, float]]:
    """(label, sparsity) a search chose, in a few entries: per group (allocate-sparsity), else
    the mean per site role over the layers ([] for other passes)."""
    d = p["details"]
    if p["pass"] == "allocate-sparsity":
        return [(g["label"], g["sparsity"]) for g in d["groups"]]
    if p["pass"] in ("sequential-search", "greedy-blocks"):
        return [(name, d["mean_sparsity_by_role"][role]) for role, name in d["role_labels"].items()]   # graph order
    if p["pass"] == "finetune-bands":
        return [(row["label"], row["after"]) for role, row in d["sparsity_by_role"].items()]
    return []


def search_summary(p: dict) -> str:
    """A search's choices in a few words: sparsity per group or role (the layers they span
    said once), then search_facts; "" for other passes."""
    levels = search_levels(p)
    if not levels:
        return ""
    common = {m.group(0) if (m := _LAYERS.match(name)) else "" for name, _ in levels}
    prefix = common.pop() if len(common) == 1 else ""
    chosen = ", ".join(f"{name.removeprefix(prefix)} {_pct(level)}" for name, level in levels)
    return f"{prefix}{chosen}; " + ", ".join(search_facts(p))


_LAYERS = re.compile(r"layers? [0-9,-]+ ")


def search_markdown(p: dict) -> list[str]:
    """A search pass's section of report.md: its facts, and a table of what it chose."""
    facts = search_facts(p)
    if not facts:
        return []
    d = p["details"]
    target = f"target {_pct(d['target'])}, " if isinstance(d.get("target"), (int, float)) else ""
    out = ["", f"## {p['id']}", "", f"{target}calibrated model-wide sparsity {_pct(d['calibrated_model_sparsity'])}; "
           + ", ".join(facts) + ".", ""]
    if p["pass"] == "allocate-sparsity":
        out += ["| group | sparsity | MACs/token | id |", "|---|---|---|---|"]
        out += [f"| {g['label']} | {_pct(g['sparsity'])} | {_macs(g['macs_per_token'])} | {g['group']} |"
                for g in d["groups"]]
    elif p["pass"] == "sequential-search":
        out += ["| threshold | sparsity | loss | budget | trials |", "|---|---|---|---|---|"]
        out += [f"| {h['label']} | {_pct(h['level'])} | {h['loss']:.5g} | {h['budget']:.5g} | "
                f"{h['trials']} |" for h in d["history"]]
    elif p["pass"] == "greedy-blocks":
        out += ["| block | sparsity | error | uniform level | its error | moves | levels |", "|---|---|---|---|---|---|---|"]
        for b in d["blocks"]:
            mine = [t for t in d["thresholds"] if t["block"] == b["block"]]
            levels = ", ".join(f"{t['label'].removeprefix(b['label'] + ' ')} {_pct(t['level'])}" for t in mine)
            out.append(f"| {b['label']} | {_pct(b['sparsity'])} | {b['error']:.4g} | "
                       f"{_pct(b['uniform_level'])} | {b['uniform_error']:.4g} | {b['moves']} | {levels} |")
    elif p["pass"] == "finetune-bands":
        out += ["| threshold | t before | t after | sparsity before | sparsity after |", "|---|---|---|---|---|"]
        out += [f"| {r['label']} | {_num(r['t_before'])} | {_num(r['t_after'])} | "
                f"{_pct(r['sparsity_before'])} | {_pct(r['sparsity_after'])} |" for r in d["thresholds"]]
    return out


def _num(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def eval_markdown(report: dict) -> str:
    r = report["result"]
    lines = [f"# sparsecc eval: {Path(report['model']).name}", "", f"Method: {report['method']}", "",
             f"Data: {report['data']}", ""]
    if "perplexity" in r:
        ref = f" (reference {r['reference_perplexity']:.3f})" if "reference_perplexity" in r else ""
        lines.append(f"- perplexity: **{r['perplexity']:.3f}**{ref} over {r['tokens']} predicted tokens")
    body, every = r["macs"]["body"], r["macs"]["all"]
    lines.append(f"- effective MACs per token: {_macs(body['effective_per_token'])} of {_macs(body['dense_per_token'])} "
                 f"dense in the body: sparsity **{_pct(body['sparsity'])}**; with heads: {_pct(every['sparsity'])} "
                 f"of {_macs(every['dense_per_token'])}")
    if "output_error" in r:
        e = r["output_error"]
        lines.append(f"- vs reference: max |diff| {e['max_abs']:.4g}, mean cosine {e['mean_cosine']:.5f}, "
                     f"top-1 agreement {_pct(e['top1_agreement'])}")
    lines += ["", "| site | group | kind | sparsity | MACs/token | effective | node |", "|---|---|---|---|---|---|---|"]
    for s in r["sites"]:
        kind = "head" if s["head"] else s["natural"] or ("threshold" if s["thresholded"] else
                                                         "compensation" if s.get("compensates") else "dense")
        lines.append(f"| {s['label']} | {s['group']} | {kind} | {_pct(s['sparsity'])} | "
                     f"{_macs(s['macs_per_token'])} | {_macs(s['effective_macs_per_token'])} | {s['site']} |")
    return "\n".join(lines) + "\n"


def eval_sweep_markdown(report: dict) -> str:
    """Several models evaluated on the same data: one row each, then each model's own report."""
    lines = [f"# sparsecc eval: {len(report['runs'])} models", "",
             "| model | method | perplexity | reference | body sparsity | with heads | top-1 vs reference |",
             "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        r = run["result"]
        cells = [run["method"]] + [f"{r[k]:.3f}" if k in r else "-" for k in ("perplexity", "reference_perplexity")]
        cells += [_pct(r["macs"]["body"]["sparsity"]), _pct(r["macs"]["all"]["sparsity"]),
                  _pct(r["output_error"]["top1_agreement"]) if "output_error" in r else "-"]
        lines.append(f"| {run['model']} | " + " | ".join(cells) + " |")
    for run in report["runs"]:
        lines += ["", eval_markdown(run).replace("# ", "## ", 1).rstrip("\n")]
    return "\n".join(lines) + "\n"


def sweep_markdown(report: dict) -> str:
    """A sweep: one row per cell (its options, what it measured, or its one-line error)."""
    sweep, runs = report["sweep"], {run["cell"]: run["result"] for run in report["runs"]}
    lines = [f"# sparsecc sweep: {sweep['cells']} cells, {sweep['ok']} complete, {sweep['failed']} failed", "",
             f"Sweep file: {sweep['file']}. Each cell's own reports: `cells/NAME/report.md` (compile), "
             "`cells/NAME/eval/report.md`, and for seneca `cells/NAME/simulation/report.md`.", "",
             "| cell | model | options | calibrated sparsity | perplexity | reference | body sparsity | top-1 vs reference "
             "| energy dense/sparse | latency dense/sparse |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["cells"]:
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "-"
        if row["status"] != "ok":
            lines.append(f"| {row['cell']} | {row['model']} | {options} | failed: {row['error']} |" + " |" * 5 + " |")
            continue
        r, sim = runs[row["cell"]], row.get("simulation")
        cells = [_pct(row["calibrated_sparsity"]) if row["calibrated_sparsity"] is not None else "-"]
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in ("perplexity", "reference_perplexity")]
        cells += [_pct(r["macs"]["body"]["sparsity"]),
                  _pct(r["output_error"]["top1_agreement"]) if "output_error" in r else "-"]
        cells += [f"{sim['energy_ratio']:.2f}x", f"{sim['latency_ratio']:.2f}x"] if sim else ["-", "-"]
        lines.append(f"| {row['cell']} | {row['model']} | {options} | " + " | ".join(cells) + " |")
    failed = [row for row in report["cells"] if row["status"] != "ok"]
    if failed:
        lines += ["", "Failed (rerun the sweep to try them again; complete cells are kept):", ""]
        lines += [f"- `{row['cell']}`: {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def eval_summary(result: dict) -> str:
    """A few lines for the terminal."""
    parts = []
    if "perplexity" in result:
        ref = result.get("reference_perplexity")
        delta = f" (reference {ref:.3f}, {100 * (result['perplexity'] / ref - 1):+.1f}%)" if ref else ""
        parts.append(f"perplexity {result['perplexity']:.3f}{delta} over {result['tokens']} tokens")
    body = result["macs"]["body"]
    parts.append(f"effective-MAC sparsity {_pct(body['sparsity'])} (body), "
                 f"{_pct(result['macs']['all']['sparsity'])} with heads")
    if "output_error" in result:
        e = result["output_error"]
        parts.append(f"vs reference: max|diff| {e['max_abs']:.4g}, cosine {e['mean_cosine']:.5f}, "
                     f"top-1 {_pct(e['top1_agreement'])}")
    return "\n".join(parts)
