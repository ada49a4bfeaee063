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
CATEGORIES = ("npe", "memory", "controller", "noc")
SPARSE, DENSE = "#1f77b4", "#b0b0b0"
CATEGORY_COLORS = {"npe": "#1f77b4", "memory": "#ff7f0e", "controller": "#2ca02c", "noc": "#d62728"}
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
    """compile, eval, eval-sweep or simulation."""
    if report.get("schema", "").startswith("sparsecc.simulation/"):
        return "simulation"
    return report.get("kind", "unknown")


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
    elif k == "simulation":
        out = _simulation_figures(report)
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


def _simulated_sites(report: dict) -> list[_Site]:
    return [_Site(s["label"], s["layer"], s["head"], s["sparsity"], 0 if s["compensates"] else s["macs_per_token"],
                  s["macs_per_token"] * (1 - s["sparsity"])) for s in report["sites"]]


# how -> where the sparsity of each site comes from (the report fields)
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


# Simulation -----------------------------------------------------------------------------------
def _simulation_figures(report: dict) -> list[Figure]:
    s, d = report["sparse"], report["dense"]
    out = []
    if "sites" in report:
        out += [f for f in _site_figures(_simulated_sites(report), "simulated", report) if f.key == "sparsity-by-layer"]
    else:
        out.append(_left_out("sparsity-by-layer", "this simulation report has no per-site sparsity (simulated before "
                                                  "it was recorded); run `sparsecc simulate` again"))
    out.append(_left_out("curve", "a simulation runs one compiled model: `sparsecc eval A/model.onnx B/model.onnx "
                                  "... -o OUT` draws the sparsity/accuracy curve of several"))
    out.append(Figure("macs", _TITLES["macs"],
                      "Simulated MAC lane-operations per token (sparse.mac_lane_ops, dense.mac_lane_ops), the dense "
                      "MACs of the linear sites (sparse.dense_macs) and, when checked, the effective MACs from ONNX "
                      "Runtime's activations (vs_ort.ort_effective_macs).",
                      lambda fig: _draw_sim_macs(fig, report), height=2.4))
    out.append(Figure("energy-by-category", _TITLES["energy-by-category"],
                      "Simulated energy per token by category, sparse vs dense baseline (same placement, thresholds "
                      "out): sparse/dense.energy_pj_per_token.",
                      lambda fig: _draw_energy_categories(fig, s, d), height=2.6))
    for key, part, label in (("energy-by-layer", "per_layer", "layer"), ("energy-by-core", "per_core", "core")):
        if s.get(part):
            out.append(Figure(key, _TITLES[key],
                              f"Sparse energy per token by {label}, stacked by category (sparse.{part}); black ticks: "
                              f"the dense baseline's total (dense.{part}).",
                              lambda fig, part=part, label=label: _draw_energy_stack(fig, s[part], d.get(part, {}), label),
                              height=2.8))
        else:
            out.append(_left_out(key, f"the report has no {part}"))
    out.append(Figure("latency", _TITLES["latency"],
                      "Left: latency per token (event-driven schedule of the token step) and the busiest core's cycles "
                      "(sparse/dense.latency_cycles_per_token, busiest_core_cycles_per_token). Middle and right: handler "
                      "(busy) cycles per token by layer (summed over the layer's cores; per_layer[].cycles) and by core "
                      "(per_core[].cycles); cores work in parallel, so these add up to more than the latency.",
                      lambda fig: _draw_latency(fig, s, d), height=2.8))
    if s.get("per_core") and s.get("mesh"):
        traffic = "flits_per_core" in s
        out.append(Figure("mesh", _TITLES["mesh"],
                          "The used part of the mesh (sparse.mesh; x = column, y = row; blank: unused core). Core load: "
                          "handler cycles per token (sparse.per_core[].cycles)"
                          + ("; NoC traffic: 32-bit flits per token each core sends and receives (sparse.flits_per_core; "
                             "a multicast packet counts at every destination)." if traffic else
                             ". This report has no per-core NoC traffic (simulated before it was recorded)."),
                          lambda fig: _draw_mesh(fig, s, report["tokens"]), height=_mesh_layout(s)[1]))
    else:
        out.append(_left_out("mesh", "the report has no per-core figures or mesh size"))
    return out


def _draw_sim_macs(fig, report: dict) -> None:
    ax = fig.add_subplot()
    s, d, tokens = report["sparse"], report["dense"], report["tokens"]
    rows = [("dense MACs (sites)", s["dense_macs"], DENSE), ("dense baseline lane-ops", d["mac_lane_ops"], DENSE),
            ("sparse lane-ops", s["mac_lane_ops"], SPARSE)]
    if "vs_ort" in report:
        rows.append(("ORT effective MACs", report["vs_ort"]["ort_effective_macs"], "#9467bd"))
    values = [v / tokens for _, v, _ in rows]
    factor, unit = _scale(max(values))
    ax.barh(range(len(rows)), [v / factor for v in values], color=[c for _, _, c in rows])
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v / factor, i, f" {v / factor:,.3g}", va="center", fontsize=7)
    ax.set_xlabel(f"{unit}MACs per token")
    ax.set_title(f"{report['ratio']['effective_macs']:.2f}x fewer lane-ops than the dense baseline")
    ax.grid(axis="x", alpha=0.3)


def _draw_energy_categories(fig, s: dict, d: dict) -> None:
    ax = fig.add_subplot()
    keys = [k for k in CATEGORIES if k in s["energy_pj_per_token"] or k in d["energy_pj_per_token"]]
    sv = [s["energy_pj_per_token"].get(k, 0.0) for k in keys]
    dv = [d["energy_pj_per_token"].get(k, 0.0) for k in keys]
    factor, unit = _scale(max(sv + dv), "J")
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [v / factor for v in dv], 0.4, color=DENSE, label="dense baseline")
    ax.bar([x + 0.2 for x in xs], [v / factor for v in sv], 0.4, color=SPARSE, label="sparse")
    ax.set_xticks(list(xs), keys)
    ax.set_ylabel(f"{unit} per token")
    total_s, total_d = s["energy_pj_per_token"]["total"], d["energy_pj_per_token"]["total"]
    ax.set_title(f"total {total_s / factor:,.3g} vs {total_d / factor:,.3g} {unit} per token "
                 f"({total_d / total_s:.2f}x)")
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)


MANY = 64   # more bars than this: drawn as steps, rasterized (a vector path per bar would weigh 100s of kB)


def _label_ticks(ax, names: list[str]) -> None:
    labels = [n.removeprefix("layer ") for n in names]
    step = max(1, -(-len(names) // (40 if len(names) <= MANY else 16)))
    ax.set_xticks(list(range(len(names)))[::step], labels[::step], fontsize=7 if len(names) <= 40 else 6)


def _draw_energy_stack(fig, rows: dict, dense_rows: dict, label: str) -> None:
    ax = fig.add_subplot()
    names = list(rows)
    factor, unit = _scale(max([r["total"] for r in rows.values()] + [r["total"] for r in dense_rows.values()]), "J")
    xs = list(range(len(names)))
    many = len(names) > MANY
    bottom = [0.0] * len(names)
    for c in CATEGORIES:
        top = [b + rows[n].get(c, 0.0) / factor for b, n in zip(bottom, names)]
        if many:
            ax.fill_between(xs, bottom, top, step="mid", color=CATEGORY_COLORS[c], label=c, linewidth=0, rasterized=True)
        else:
            ax.bar(xs, [t - b for t, b in zip(top, bottom)], 0.8, bottom=bottom, color=CATEGORY_COLORS[c], label=c)
        bottom = top
    dense = [(x, dense_rows[n]["total"] / factor) for x, n in zip(xs, names) if n in dense_rows]
    if dense and many:
        ax.step([x for x, _ in dense], [y for _, y in dense], where="mid", color="black", linewidth=0.6,
                label="dense total", rasterized=True)
    elif dense:
        ax.scatter([x for x, _ in dense], [y for _, y in dense], marker="_", s=60, color="black", label="dense total",
                   zorder=3)
    _label_ticks(ax, names)
    ax.set_xlabel(label)
    ax.set_ylabel(f"{unit} per token")
    _legend(ax)
    ax.grid(axis="y", alpha=0.3)


def _draw_latency(fig, s: dict, d: dict) -> None:
    per_layer = all("cycles" in row for row in s.get("per_layer", {}).values()) and bool(s.get("per_layer"))
    axes = fig.subplots(1, 3 if per_layer else 2, width_ratios=[1, 2, 2] if per_layer else [1, 2])
    ax = axes[0]
    keys = (("latency_cycles_per_token", "latency"), ("busiest_core_cycles_per_token", "busiest\ncore"))
    xs = range(len(keys))
    factor, unit = _scale(max(max(s[k], d[k]) for k, _ in keys))
    ax.bar([x - 0.2 for x in xs], [d[k] / factor for k, _ in keys], 0.4, color=DENSE, label="dense")
    ax.bar([x + 0.2 for x in xs], [s[k] / factor for k, _ in keys], 0.4, color=SPARSE, label="sparse")
    ax.set_xticks(list(xs), [n for _, n in keys])
    ax.set_ylabel(f"{unit}cycles per token")
    ax.set_title(f"{s['latency_s_per_token'] * 1e3:.3g} vs {d['latency_s_per_token'] * 1e3:.3g} ms")
    panels = ([("per_layer", "layer")] if per_layer else []) + [("per_core", "core")]
    for ax, (part, label) in zip(axes[1:], panels):
        names = list(s.get(part, {}))
        sv = [s[part][n].get("cycles", 0.0) for n in names]
        dv = [d.get(part, {}).get(n, {}).get("cycles", 0.0) for n in names]
        factor, unit = _scale(max(sv + dv + [1.0]))
        xs = list(range(len(names)))
        if len(names) > MANY:
            ax.fill_between(xs, [v / factor for v in sv], step="mid", color=SPARSE, linewidth=0, rasterized=True)
            ax.step(xs, [v / factor for v in dv], where="mid", color="#808080", linewidth=0.6, rasterized=True)
        else:
            ax.bar([x - 0.2 for x in xs], [v / factor for v in dv], 0.4, color=DENSE)
            ax.bar([x + 0.2 for x in xs], [v / factor for v in sv], 0.4, color=SPARSE)
        _label_ticks(ax, names)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{unit}cycles per token (busy)")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    _legend(axes[-1], axes)


def _mesh_box(s: dict) -> tuple[list[int], int, int, int, int]:
    """(used cores, first row, last row, first column, last column): the part of the mesh drawn."""
    cols = s["mesh"]["cols"]
    cores = sorted({int(c) for c in s["per_core"]} | {int(c) for c in s.get("flits_per_core", {})})
    ys, xs = [c // cols for c in cores], [c % cols for c in cores]
    return cores, min(ys), max(ys), min(xs), max(xs)


def _mesh_layout(s: dict) -> tuple[bool, float]:
    """(panels stacked, figure height in inches) for the mesh figure: a wide strip of cores
    stacks its panels, a squarer block puts them side by side."""
    _, y0, y1, x0, x1 = _mesh_box(s)
    h, w = y1 - y0 + 1, x1 - x0 + 1
    panels = 3 if "flits_per_core" in s else 1
    if w >= 2 * h:
        return True, min(9.0, panels * (0.55 + (WIDTH - 1.6) * h / w))
    return False, min(6.0, 1.6 + (WIDTH / panels - 0.5) * h / w)


def _draw_mesh(fig, s: dict, tokens: int) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    rows, cols = s["mesh"]["rows"], s["mesh"]["cols"]
    flits = s.get("flits_per_core")
    cores, y0, y1, x0, x1 = _mesh_box(s)
    panels = [("core load (cycles/token)", {c: s["per_core"].get(str(c), {}).get("cycles", 0.0) for c in cores})]
    if flits is not None:
        panels += [("flits sent/token", {c: flits.get(str(c), {}).get("sent", 0) / tokens for c in cores}),
                   ("flits received/token", {c: flits.get(str(c), {}).get("received", 0) / tokens for c in cores})]
    stacked, _ = _mesh_layout(s)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0] if stacked else fig.subplots(1, len(panels), squeeze=False)[0]
    small = (y1 - y0 + 1) * (x1 - x0 + 1) <= 64
    for ax, (title, values) in zip(axes, panels):
        grid = np.full((y1 - y0 + 1, x1 - x0 + 1), np.nan)
        for c, v in values.items():
            grid[c // cols - y0, c % cols - x0] = v
        top = max(float(np.nanmax(grid)), 1e-12)   # from 0: a 10% spread must not fill the colour map
        mesh = ax.pcolormesh(np.arange(x0, x1 + 2) - 0.5, np.arange(y0, y1 + 2) - 0.5, np.ma.masked_invalid(grid),
                             cmap="viridis", vmin=0.0, vmax=top, edgecolors="white", linewidth=0.5, rasterized=not small)
        ax.set_xlim(x0 - 0.5, x1 + 0.5)
        ax.set_ylim(y1 + 0.5, y0 - 0.5)   # row 0 at the top
        ax.set_aspect("equal")
        for axis, lo, hi in ((ax.xaxis, x0, x1), (ax.yaxis, y0, y1)):
            if hi - lo < 16:
                axis.set_ticks(range(lo, hi + 1))
            else:
                axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        if small:   # label each core, dark text on the light (high) end of the colour map
            for c in cores:
                light = values[c] / top > 0.6
                ax.text(c % cols, c // cols, str(c), ha="center", va="center", fontsize=6,
                        color="black" if light else "white")
        fig.colorbar(mesh, ax=ax, location="right" if stacked else "bottom", shrink=0.9, aspect=10 if stacked else 25)
    fig.suptitle(f"{len(cores)} cores used of {rows} x {cols}", fontsize=8)


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
    return f"sparsecc simulate: {report['tokens']} tokens on {report['target']}"


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
        s, d, r = report["sparse"], report["dense"], report["ratio"]
        rows.append(("tokens", f"{report['tokens']} in {report['windows']} window(s) on {report['target']}"))
        rows.append(("energy per token", f"{s['energy_pj_per_token']['total'] / 1e6:.4g} µJ sparse vs "
                                         f"{d['energy_pj_per_token']['total'] / 1e6:.4g} µJ dense ({r['energy']:.2f}x)"))
        rows.append(("latency per token", f"{s['latency_s_per_token'] * 1e3:.4g} ms vs {d['latency_s_per_token'] * 1e3:.4g} ms "
                                          f"({r['latency']:.2f}x)"))
        rows.append(("MAC lane-ops", f"{s['mac_lane_ops']:,} vs {d['mac_lane_ops']:,} ({r['effective_macs']:.2f}x)"))
        rows.append(("NoC", f"{s['flits']:,} flits, {s['flit_hops']:,} flit-hops (dense {d['flits']:,}, {d['flit_hops']:,})"))
        if "vs_ort" in report:
            v = report["vs_ort"]
            p = v["with_ort_decisions"]
            differing = (f"; its own decisions differ from ORT's in {p['decisions_differing']:,} of "
                         f"{p['threshold_decisions']:,}, all within {p['largest_relative_margin_at_difference']:.2%} of t"
                         if "threshold_decisions" in p else "")
            rows.append(("argmax agreement with ONNX Runtime",
                         f"{v['argmax_agreement']:.1%} with the simulator's own threshold and quantizer decisions, "
                         f"{p['argmax_agreement']:.1%} with ORT's decisions{differing}"))
            rows.append(("max |logit diff| vs ONNX Runtime",
                         f"{v['max_abs_logit_diff']:.3g} with its own decisions, {p['max_abs_logit_diff']:.3g} with ORT's "
                         f"(logits up to {v['max_abs_logit']:.3g})"))
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
