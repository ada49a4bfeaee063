"""The report page: one self-contained HTML file, `report.html`, beside every report.json.

`render(report)` draws what a compile, eval (one model or several) or simulation report holds
with matplotlib as inline SVG: no script, no network, nothing to install to read it. A figure
whose data the report lacks is left out with a note saying why, never drawn empty. The page
is byte-identical for the same report (fixed SVG hash salt, no dates, ids prefixed per
figure so the inline SVGs share no id). Sites are named by layer and role (sparsecc.site_names);
legends sit beside the axes, never over what is drawn; colour scales start at 0.

Figures (ids as on the page, `fig-` + key):
    sparsity-by-layer   per-site sparsity, grouped by layer (compile: calibrated; eval: measured;
                        simulation: as simulated)
    macs                effective vs dense MACs per token (per layer, per model, or simulated lane-ops)
    training            a compile that distilled: the loss per step (only on such a page)
    curve               sparsity vs perplexity and top-1 agreement, one line per method (eval of several)
    energy-by-category  simulated energy per token by category, sparse vs dense baseline
    energy-by-layer     ... by layer, stacked by category
    energy-by-core      ... by core, stacked by category
    latency             latency per token and handler cycles by layer and by core, sparse vs dense
    mesh                heat maps over the mesh: core load (cycles), NoC flits sent and received
"""
from __future__ import annotations

import dataclasses
import html
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

FIGURES = ("sparsity-by-layer", "macs", "training", "curve", "energy-by-category", "energy-by-layer",
           "energy-by-core", "latency", "mesh")
SPARSE, DENSE = "#1f77b4", "#b0b0b0"
WIDTH = 7.2   # inches: two figures side by side on a wide screen
RASTER_DPI = 144   # the few dense parts drawn as images (big meshes, hundreds of cores)
_NO_ENERGY = "no energy model in this report: `sparsecc compile ... --target seneca` then `sparsecc simulate OUT` measures it"


@dataclasses.dataclass
class Figure:
    key: str
    title: str
    caption: str = ""                       # what is drawn, from which report fields
    draw: Callable[[Any], None] | None = None   # draws on a matplotlib Figure; None: left out
    note: str = ""                          # why it is left out
    height: float = 3.2


def kind(report: dict) -> str:
    """compile, eval, eval-sweep, or the kind of a backend's run report (seneca's simulation)."""
    section = _section(report)
    return section.KIND if section is not None else report.get("kind", "unknown")


def _section(report: dict):
    """The report section of the backend that wrote this run report (`Backend.report_section`), else None."""
    from sparsecc import backends

    return backends.report_section(report)


def figures(report: dict) -> list[Figure]:
    """Every figure of FIGURES for this report, drawn or left out with a note."""
    k = kind(report)
    if k == "compile":
        out = _site_figures(_compile_sites(report), "calibrated", report)
        out += [_left_out("curve", "one compile: `sparsecc eval A/model.onnx B/model.onnx ... -o OUT` draws the "
                                   "sparsity/accuracy curve of several")]
        out += _training_figures(report)
        out += [_left_out(key, _NO_ENERGY) for key in FIGURES[4:]]
    elif k == "eval":
        out = _site_figures(_eval_sites(report["result"]), "measured", report)
        out += [_left_out("curve", "one model evaluated: pass several to `sparsecc eval A/model.onnx B/model.onnx "
                                   "... -o OUT` for the sparsity/accuracy curve")]
        out += [_left_out(key, _NO_ENERGY) for key in FIGURES[4:]]
    elif k == "eval-sweep":
        out = _sweep_figures(report) + [_left_out(key, _NO_ENERGY) for key in FIGURES[4:]]
    elif _section(report) is not None:
        out = _section(report).figures(report)
    else:
        raise ValueError(f"not a sparsecc report (kind {k!r})")
    order = {key: i for i, key in enumerate(FIGURES)}
    return sorted(out, key=lambda f: order[f.key])


def render(report: dict) -> str:
    """The report page as one HTML document."""
    import matplotlib

    k = kind(report)
    title = _title(report)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
             f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
             f"<h1>{html.escape(title)}</h1>\n", _facts(report, k), "<main class=\"figures\">\n"]
    omitted = []
    for fig in figures(report):
        fid = f"fig-{fig.key}"
        if fig.draw is None:
            omitted.append(f"<li id=\"{fid}\" data-omitted=\"{fig.key}\"><b>{html.escape(fig.title)}</b>: "
                           f"{html.escape(fig.note)}</li>\n")
            continue
        with matplotlib.rc_context(RC):
            svg = _svg(fig, fid)
        parts.append(f"<figure class=\"plot\" id=\"{fid}\" data-figure=\"{fig.key}\"><h2>{html.escape(fig.title)}</h2>\n"
                     f"{svg}\n<figcaption>{html.escape(fig.caption)}</figcaption></figure>\n")
    parts.append("</main>\n")
    if omitted:
        parts.append("<section class=\"omitted\"><h2>Left out (no data for them in this report)</h2>\n<ul>\n"
                     + "".join(omitted) + "</ul></section>\n")
    made = [f"sparsecc {report['sparsecc']}"] if "sparsecc" in report else []
    parts.append(f"<footer>{html.escape(' · '.join(made + [report.get('schema', ''), 'the numbers behind every figure are in report.json']))}"
                 f"</footer>\n</body>\n</html>\n")
    return "".join(parts)


# matplotlib settings of every figure (svg.hashsalt: the same ids for the same figure)
RC = {"svg.hashsalt": "sparsecc", "svg.fonttype": "none", "font.size": 8, "axes.titlesize": 9,
      "legend.fontsize": 7, "figure.dpi": 72}


def drawn(fig: Figure):
    """`fig` drawn on a matplotlib figure of the page's size (under RC)."""
    from matplotlib.figure import Figure as MplFigure

    canvas = MplFigure(figsize=(WIDTH, fig.height), layout="constrained")
    fig.draw(canvas)
    return canvas


def _svg(fig: Figure, fid: str) -> str:
    canvas = drawn(fig)
    buffer = io.StringIO()
    canvas.savefig(buffer, format="svg", dpi=RASTER_DPI, metadata={"Date": None})   # dpi: rasterized parts only
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # every id local to this figure: inline SVGs share the document's id space
    text = re.sub(r'\bid="([^"]+)"', rf'id="{fid}-\1"', text)
    text = re.sub(r'url\(#([^)]+)\)', rf'url(#{fid}-\1)', text)
    return re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{fid}-\1"', text).strip()


def _left_out(key: str, note: str) -> Figure:
    return Figure(key, _TITLES[key], note=note)


_TITLES = {
    "sparsity-by-layer": "Sparsity per site, by layer",
    "macs": "Effective vs dense MACs per token",
    "training": "Distillation: loss per step",
    "curve": "Sparsity / accuracy",
    "energy-by-category": "Energy per token by category",
    "energy-by-layer": "Energy per token by layer",
    "energy-by-core": "Energy per token by core",
    "latency": "Latency and cycles",
    "mesh": "Mesh: core load and NoC traffic",
}


# Sites -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Site:
    name: str               # its label, from structure (sparsecc.site_names), e.g. "layer 3 q"
    layer: int | None       # None: head or no repeated layers
    head: bool
    sparsity: float | None  # None: not known (compile: a compensation factor)
    macs: int               # dense MACs per token (0 for a compensation factor: not in the dense baseline)
    effective: float        # effective MACs per token


def _compile_sites(report: dict) -> list[_Site] | None:
    """Calibrated sparsity per site from the pass that set the thresholds (None: no thresholds set)."""
    from sparsecc.inspection import calibrated_sparsity

    sites = report.get("sites", [])
    order = list(dict.fromkeys(s["threshold"] for s in sites if s.get("threshold")))
    by_threshold, setter = calibrated_sparsity(report, order)
    if setter is None:
        return None
    natural: dict[str, float] = {}
    for p in report.get("passes", []):
        rows = p["details"].get("natural")
        if isinstance(rows, list):   # calibrate-thresholds: [{site, sparsity}]; other passes: names or a count
            natural |= {r["site"]: r["sparsity"] for r in rows if isinstance(r, dict) and "sparsity" in r}
    out = []
    for s in sites:
        if s.get("compensates"):
            sparsity = None
        elif s.get("threshold"):
            sparsity = by_threshold.get(s["threshold"])
        else:
            sparsity = natural.get(s["node"], 0.0 if not s.get("natural") else None)
        dense = 0 if s.get("compensates") else s["macs_per_token"]
        effective = s["macs_per_token"] * (1 - sparsity) if sparsity is not None else s["macs_per_token"]
        out.append(_Site(s["label"], s.get("layer"), s["head"], sparsity, dense, effective))
    return out


def _eval_sites(result: dict) -> list[_Site]:
    return [_Site(s["label"], s.get("layer"), s["head"], s["sparsity"], 0 if s.get("compensates") else s["macs_per_token"],
                  s["effective_macs_per_token"]) for s in result["sites"]]


_SPARSITY_SOURCE = {
    "calibrated": "on the calibration data, passes[].details of the pass that set the thresholds",
    "measured": "measured in ONNX Runtime on the evaluation data, result.sites[].sparsity",
    "simulated": "of the events the site's tiles read in the simulation, sites[].sparsity",
}


def _site_figures(sites: list[_Site] | None, how: str, report: dict) -> list[Figure]:
    if not sites:
        why = ("no thresholds were set (compile without --calib/--sparsity keeps the model dense)" if sites is None
               else "the model has no linear sites")
        return [_left_out("sparsity-by-layer", why), _left_out("macs", why)]
    layered = any(s.layer is not None for s in sites)
    caption = (f"{how.capitalize()} sparsity of each linear site's input (fraction of zero activations "
               f"{_SPARSITY_SOURCE[how]} in report.json). Bars in graph order within each layer, named by role; layers "
               "found from the recurrence of site roles" + ("" if layered else " (none repeat here: one bar per site in "
                                                                                "graph order)") + "; the head last, in grey.")
    compensation = any(s.macs == 0 and not s.head for s in sites)
    macs_caption = ("Dense MACs per token of each layer's sites vs effective MACs (non-zero inputs x outputs; "
                    + ("estimated from the calibrated sparsity: sites[].macs_per_token x (1 - sparsity)"
                       + ("; low-rank compensation factors counted dense" if compensation else "")
                       if how == "calibrated" else "result.sites[].effective_macs_per_token, measured")
                    + "). Compensation factors add effective MACs, not dense ones.")
    n_layers = max((s.layer for s in sites if s.layer is not None), default=-1) + 1
    return [Figure("sparsity-by-layer", _TITLES["sparsity-by-layer"], caption,
                   lambda fig: _draw_sparsity(fig, sites, how), height=3.0 if n_layers < 40 else 3.6),
            Figure("macs", _TITLES["macs"], macs_caption, lambda fig: _draw_macs_by_layer(fig, sites), height=2.8)]


def _bucket(site: _Site, layered: bool) -> str:
    if site.head:
        return "head"
    if layered:
        return f"{site.layer}" if site.layer is not None else "other"
    return "body"


def _buckets(sites: list[_Site]) -> dict[str, list[_Site]]:
    layered = any(s.layer is not None for s in sites)
    out: dict[str, list[_Site]] = {}
    for s in sorted(sites, key=lambda s: (s.head, s.layer is None, s.layer or 0)):   # stable: graph order within
        out.setdefault(_bucket(s, layered), []).append(s)
    return out


def _draw_sparsity(fig, sites: list[_Site], how: str) -> None:
    ax = fig.add_subplot()
    buckets = _buckets(sites)
    layered = any(s.layer is not None for s in sites)
    if not layered:   # no layers: one bar per site
        body = [s for s in sites if not s.head] + [s for s in sites if s.head]
        known = [(x, s) for x, s in enumerate(body) if s.sparsity is not None]
        ax.bar([x for x, _ in known], [s.sparsity for _, s in known], color=[DENSE if s.head else SPARSE for _, s in known],
               width=0.8)
        if len(body) <= 40:
            ax.set_xticks(range(len(body)), [s.name for s in body], rotation=90, fontsize=7)
        ax.set_xlabel("site (graph order; grey: head)")
    else:   # one bar call per position in the layer (q, k, v, ...), over all layers
        names = list(buckets)
        slots = max(len(v) for v in buckets.values())
        width, first, colors = 0.85 / slots, buckets[names[0]], _palette(slots)
        for j in range(slots):
            xs, heights, fill = [], [], []
            for x, name in enumerate(names):
                members = buckets[name]
                if j < len(members) and members[j].sparsity is not None:   # a compile's compensation factor: unknown
                    xs.append(x + (j - (len(members) - 1) / 2) * width)
                    heights.append(members[j].sparsity)
                    fill.append(DENSE if members[j].head else colors[j])
            label = _short(_role(first[j].name)) if j < len(first) else None
            ax.bar(xs, heights, width * 0.95, color=fill, label=label)
        ax.set_xticks(range(len(buckets)), list(buckets), fontsize=7 if len(buckets) < 40 else 5)
        ax.set_xlabel("layer")
        _legend(ax, title="site", title_fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{how} sparsity")
    ax.yaxis.set_major_formatter(_percent())
    ax.grid(axis="y", alpha=0.3)


def _draw_macs_by_layer(fig, sites: list[_Site]) -> None:
    ax = fig.add_subplot()
    buckets = _buckets(sites)
    dense = [sum(s.macs for s in v) for v in buckets.values()]
    effective = [sum(s.effective for s in v) for v in buckets.values()]
    factor, unit = _scale(max(dense + effective))
    xs = range(len(buckets))
    ax.bar([x - 0.2 for x in xs], [d / factor for d in dense], 0.4, color=DENSE, label="dense")
    ax.bar([x + 0.2 for x in xs], [e / factor for e in effective], 0.4, color=SPARSE, label="effective")
    ax.set_xticks(list(xs), list(buckets), fontsize=7 if len(buckets) < 40 else 5)
    ax.set_xlabel("layer" if any(s.layer is not None for s in sites) else "")
    ax.set_ylabel(f"{unit}MACs per token")
    total_d, total_e = sum(s.macs for s in sites if not s.head), sum(s.effective for s in sites if not s.head)
    if total_d:
        ax.set_title(f"body: {total_e / factor:,.3g} of {total_d / factor:,.3g} {unit}MACs "
                     f"({1 - total_e / total_d:.1%} saved)")
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)


def _role(label: str) -> str:
    """A site's label without its layer: `layer 3 q` -> `q`."""
    return re.sub(r"^layers? [0-9,-]+ ", "", label)


def _legend(ax, panels=(), **options) -> None:
    """A legend beside `ax`, on its right, never over what is drawn (constrained layout makes
    the room), of what `ax` and the other `panels` of the figure draw (each label once)."""
    found: dict = {}
    for panel in [ax, *panels]:
        for handle, text in zip(*panel.get_legend_handles_labels()):
            found.setdefault(text, handle)
    ax.legend(list(found.values()), list(found), loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              frameon=False, **options)


# Several models -------------------------------------------------------------------------------
def run_label(run: dict) -> str:
    """A model's name on the page: its compile folder (model.onnx), else its file name."""
    path = Path(run["model"])
    return path.parent.name if path.name == "model.onnx" and path.parent.name else path.name


def _sweep_figures(report: dict) -> list[Figure]:
    runs = report["runs"]
    if not runs:
        return [_left_out(key, "no cell of the sweep completed (see the table above)")
                for key in ("sparsity-by-layer", "macs", "curve")]
    labels = [run_label(r) for r in runs]
    out = []
    have_ppl = all("perplexity" in r["result"] for r in runs)
    have_top1 = all("output_error" in r["result"] for r in runs)
    if have_ppl or have_top1:
        out.append(Figure("curve", _TITLES["curve"],
                          "One point per model, one line per method (runs[].method: the passes that compiled it, "
                          "from its config.yaml), in order of sparsity: measured effective-MAC sparsity of the body "
                          "(result.macs.body.sparsity) against perplexity (result.perplexity; dashed: "
                          "result.reference_perplexity, the uncompiled model) and top-1 agreement with the reference "
                          "(result.output_error.top1_agreement).",
                          lambda fig: _draw_curve(fig, runs, labels, have_ppl, have_top1), height=3.0))
    else:
        out.append(_left_out("curve", "no perplexity (token data) and no reference to compare with"))
    per_run = [_eval_sites(r["result"]) for r in runs]
    out.append(Figure("sparsity-by-layer", _TITLES["sparsity-by-layer"],
                      "Measured sparsity per layer, MAC-weighted over the layer's sites (result.sites[].effective_macs_per_token "
                      "and macs_per_token), one line per model; layers from the recurrence of site roles.",
                      lambda fig: _draw_sweep_layers(fig, per_run, labels), height=2.8))
    out.append(Figure("macs", _TITLES["macs"],
                      "Dense vs effective MACs per token of the body and of all sites, per model (result.macs).",
                      lambda fig: _draw_sweep_macs(fig, runs, labels), height=2.8))
    return out


def _training_figures(report: dict) -> list[Figure]:
    """The loss curve of each distill pass of a compile (none when nothing was distilled)."""
    runs = [p for p in report["passes"] if p["pass"] == "distill"]
    if not runs:
        return []
    d = runs[-1]["details"]
    t = d["training"]
    caption = (f"Training loss per step (report.json passes[].details.history, at most 200 points) of distill: "
               f"{t['tokens']:,} tokens, {t['steps']} steps, {t['training_seconds']:.0f} s on {t['device']}. "
               "KL to the teacher (the model with its thresholds open) and, where trained on, cross-entropy.")
    return [Figure("training", _TITLES["training"], caption, lambda fig: _draw_training(fig, d["history"]), height=2.6)]


def _draw_training(fig, history: list[dict]) -> None:
    ax = fig.subplots()
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], color=SPARSE, label="loss")
    if history and "ce" in history[0] and any(h["loss"] != h["kl"] for h in history):
        ax.plot(steps, [h["kl"] for h in history], color="#ff7f0e", label="KL")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend(ax)


def _draw_curve(fig, runs, labels, have_ppl: bool, have_top1: bool) -> None:
    axes = fig.subplots(1, have_ppl + have_top1, squeeze=False)[0]
    xs = [r["result"]["macs"]["body"]["sparsity"] for r in runs]
    methods: dict[str, list[int]] = {}
    for i in sorted(range(len(runs)), key=lambda i: xs[i]):   # each method's runs in order of sparsity
        methods.setdefault(runs[i]["method"], []).append(i)
    colors = _palette(len(methods))
    panels = ([("perplexity", lambda r: r["result"]["perplexity"], "reference_perplexity")] if have_ppl else []) + (
        [("top-1 agreement", lambda r: r["result"]["output_error"]["top1_agreement"], None)] if have_top1 else [])
    for ax, (name, get, ref_key) in zip(axes, panels):
        ys = [get(r) for r in runs]
        for (method, members), color in zip(methods.items(), colors):
            ax.plot([xs[i] for i in members], [ys[i] for i in members], "o-", color=color, label=method)
        for i in range(len(runs)):
            ax.annotate(labels[i], (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        refs = sorted({r["result"][ref_key] for r in runs if ref_key and ref_key in r["result"]})
        for j, ref in enumerate(refs):
            ax.axhline(ref, color=DENSE, linestyle="--", label="reference (uncompiled)" if j == 0 else None)
        ax.set_xlabel("effective-MAC sparsity (body)")
        ax.set_ylabel(name)
        ax.xaxis.set_major_formatter(_percent())
        if name.startswith("top-1"):
            ax.yaxis.set_major_formatter(_percent())
        ax.grid(alpha=0.3)
    _legend(axes[-1], axes, title="method", title_fontsize=7)


def _draw_sweep_layers(fig, per_run: list[list[_Site]], labels: list[str]) -> None:
    ax = fig.add_subplot()
    colors = _palette(len(per_run))
    names: list[str] = []
    for sites, label, color in zip(per_run, labels, colors):
        buckets = _buckets(sites)
        names = names if len(names) >= len(buckets) else list(buckets)
        ys = [1 - sum(s.effective for s in v) / max(1, sum(s.macs for s in v)) for v in buckets.values()]
        ax.plot(range(len(ys)), ys, "o-", color=color, label=label, markersize=3)
    ax.set_xticks(range(len(names)), names, fontsize=7 if len(names) < 40 else 5)
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (MAC-weighted)")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(_percent())
    _legend(ax)
    ax.grid(alpha=0.3)


def _draw_sweep_macs(fig, runs, labels) -> None:
    axes = fig.subplots(1, 2)
    for ax, part in zip(axes, ("body", "all")):
        dense = [r["result"]["macs"][part]["dense_per_token"] for r in runs]
        effective = [r["result"]["macs"][part]["effective_per_token"] for r in runs]
        factor, unit = _scale(max(dense + effective))
        xs = range(len(runs))
        ax.bar([x - 0.2 for x in xs], [d / factor for d in dense], 0.4, color=DENSE, label="dense")
        ax.bar([x + 0.2 for x in xs], [e / factor for e in effective], 0.4, color=SPARSE, label="effective")
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=20 if len(runs) > 4 else 0)
        ax.set_title("body (all but heads)" if part == "body" else "all sites")
        ax.set_ylabel(f"{unit}MACs per token")
        ax.grid(axis="y", alpha=0.3)
    _legend(axes[-1])


# Page parts -----------------------------------------------------------------------------------
def _title(report: dict) -> str:
    k = kind(report)
    if k == "compile":
        return f"sparsecc compile: {Path(report['source']['model']).name} for {report['target']['backend']}"
    if k == "eval":
        return f"sparsecc eval: {run_label(report)}"
    if k == "eval-sweep" and "sweep" in report:
        sweep = report["sweep"]
        return f"sparsecc sweep: {sweep['cells']} cells, {sweep['ok']} complete, {sweep['failed']} failed"
    if k == "eval-sweep":
        return f"sparsecc eval: {len(report['runs'])} models"
    return _section(report).title(report)


def _facts(report: dict, k: str) -> str:
    rows: list[tuple[str, str]] = []
    if k == "compile":
        rows.append(("model", report["source"]["model"]))
        rows.append(("passes", ", ".join(p["id"] for p in report["passes"])))
        setters = [p for p in report["passes"] if "calibrated_model_sparsity" in p["details"]]
        if setters:
            det = setters[-1]["details"]
            target = f" (target {det['target']:.1%})" if isinstance(det.get("target"), (int, float)) else ""
            rows.append(("calibrated model-wide sparsity", f"{det['calibrated_model_sparsity']:.1%}{target}, "
                                                           f"set by {setters[-1]['id']}"))
        declined = report["target"].get("declined") or {}
        rows.append(("target", report["target"]["backend"] + (f"; declined {len(declined)} nodes" if declined else "")))
        if report.get("data"):
            rows.append(("calibration data", _data_text(report["data"])))
    elif k == "eval":
        rows += _eval_facts(report)
    elif k == "eval-sweep":
        body = "".join(f"<tr><td>{html.escape(run_label(r))}</td>"
                       + "".join(f"<td>{html.escape(v)}</td>" for _, v in _eval_facts(r)[1:]) + "</tr>"
                       for r in report["runs"])
        names = [n for n, _ in _eval_facts(report["runs"][0])[1:]] if report["runs"] else []
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        failed = [c for c in report.get("cells", []) if c["status"] != "ok"]   # a sweep's cells that did not complete
        body += "".join(f"<tr><td>{html.escape(c['cell'])}</td><td colspan=\"{max(1, len(names))}\">failed: "
                        f"{html.escape(c['error'])}</td></tr>" for c in failed)
        return f"<table class=\"facts\"><tr><th>model</th>{head}</tr>{body}</table>\n"
    else:
        rows += _section(report).facts(report)
    cells = "".join(f"<tr><th>{html.escape(n)}</th><td>{html.escape(v)}</td></tr>" for n, v in rows)
    return f"<table class=\"facts\">{cells}</table>\n"


def _eval_facts(report: dict) -> list[tuple[str, str]]:
    """The same rows for every eval report (\"-\" where it has no such figure): one table row per model in a sweep."""
    r = report["result"]
    ref = f" (reference {r['reference_perplexity']:.3f})" if "reference_perplexity" in r else ""
    e = r.get("output_error")
    return [("model", report["model"]), ("method", report["method"]),
            ("perplexity", f"{r['perplexity']:.3f}{ref}" if "perplexity" in r else "-"),
            ("effective-MAC sparsity", f"{r['macs']['body']['sparsity']:.1%} body, "
                                       f"{r['macs']['all']['sparsity']:.1%} with heads"),
            ("vs reference", f"top-1 {e['top1_agreement']:.1%}, cosine {e['mean_cosine']:.4f}" if e else "-"),
            ("data", _data_text(report.get("data")))]


def _data_text(data: Any) -> str:
    """A data source's description (FeedSource.describe) in a few words."""
    if not isinstance(data, dict):
        return str(data)
    where = Path(str(data.get("path", ""))).name or data.get("kind", "data")
    if "seq_len" in data and "windows" in data:
        return f"{where}: {data['windows']} windows of {data['seq_len']} tokens"
    return f"{where}: {data['samples']} samples" if "samples" in data else str(where)


def _palette(n: int) -> list[str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _short(name: str, keep: int = 26) -> str:
    return name if len(name) <= keep else "…" + name[-keep + 1:]


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _scale(value: float, base: str = "") -> tuple[float, str]:
    """(divisor, prefix + unit) for values up to `value`: pJ inputs for base "J", plain counts otherwise."""
    if base == "J":
        for factor, unit in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
            if value >= factor:
                return factor, unit
        return 1.0, "pJ"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return factor, prefix
    return 1.0, ""


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:1.5rem auto;max-width:1500px;
padding:0 1rem;color:#222;background:#fff}
h1{font-size:1.35rem;margin:0 0 .8rem}h2{font-size:1rem;margin:.2rem 0 .4rem}
table.facts{border-collapse:collapse;font-size:.85rem;margin-bottom:1rem}
table.facts th,table.facts td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
table.facts th{background:#f6f6f6;font-weight:600}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(620px,1fr));gap:1rem}
figure.plot{margin:0;padding:.6rem;border:1px solid #e3e3e3;border-radius:6px}
section.omitted{margin-top:1rem;font-size:.85rem;color:#666}section.omitted ul{margin:.2rem 0;padding-left:1.2rem}
figure.plot svg{width:100%;height:auto;display:block}
figcaption{font-size:.78rem;color:#555;margin-top:.3rem}
footer{font-size:.75rem;color:#888;margin-top:1.2rem}
"""
