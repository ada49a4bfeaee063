"""The seneca backend's section of the reports: its simulation report (`simulation.simulate`)
in the terminal, in report.md and on the report page (`sparsecc.report_page` draws what
`figures` returns, with `title` and `facts` at the top). `SenecaBackend.report_section` hands
this module to the core."""
from __future__ import annotations

from sparsecc.report import _pct
from sparsecc.report_page import _TITLES, DENSE, SPARSE, WIDTH, Figure, _left_out, _legend, _scale, _Site, _site_figures

SCHEMA = "sparsecc.simulation/"   # the run reports this section draws
KIND = "simulation"
CATEGORIES = ("npe", "memory", "controller", "noc")
CATEGORY_COLORS = {"npe": "#1f77b4", "memory": "#ff7f0e", "controller": "#2ca02c", "noc": "#d62728"}


def summary(report: dict, speed: dict | None = None) -> str:
    s, d, r = report["sparse"], report["dense"], report["ratio"]
    lines = [f"{report['tokens']} tokens on {report['target']}: "
             f"{s['energy_pj_per_token']['total'] / 1e6:.3f} uJ/token sparse vs {d['energy_pj_per_token']['total'] / 1e6:.3f} "
             f"dense ({r['energy']:.2f}x), latency {s['latency_s_per_token'] * 1e3:.3f} ms vs "
             f"{d['latency_s_per_token'] * 1e3:.3f} ms ({r['latency']:.2f}x)"]
    if "vs_ort" in report:
        v = report["vs_ort"]
        lines.append(f"vs ort: argmax agreement {_pct(v['argmax_agreement'])}, max |logit diff| "
                     f"{v['max_abs_logit_diff']:.4g} (of {v['max_abs_logit']:.4g}), MAC lane-ops {v['simulator_mac_lane_ops']} "
                     f"vs {v['ort_effective_macs']} from ORT activations ({v['mac_difference']:+.4%})")
        p = v["with_ort_decisions"]
        lines.append(f"vs ort with ORT's decisions (thresholds, quantizers): argmax agreement {_pct(p['argmax_agreement'])}, max |logit diff| "
                     f"{p['max_abs_logit_diff']:.4g}, MAC lane-ops vs ORT activations {p['mac_difference']:+.4%}; own decisions differing {p['decisions_differing']} of "
                     f"{p['threshold_decisions']}, all within {p['largest_relative_margin_at_difference']:.2%} of t"
                     + (f"; own int8 values differing {p['quantized_differing']} of {p['quantized_values']}, by at most "
                        f"{p['largest_step_difference']} step(s)" if "quantized_values" in p else ""))
    if "state" in report:   # a step graph: its resident state
        st = report["state"]
        growth = (f"+{st['bytes_per_position']:,} bytes per position, fits up to context {st['fits_up_to_context']}"
                  if st["grows"] else "constant")
        lines.append(f"state resident in {len(st['per_core'])} cores: "
                     f"{st['by_context'][str(st['run_positions'])]['resident_bytes']:,} bytes after {st['run_positions']} "
                     f"tokens ({growth})")
    for row in report.get("positions", []):
        lines.append(f"at position {row['position']} (state warmed with {row['state_warmed_with']}, {row['tokens']} "
                     f"simulated): {row['sparse']['energy_pj_per_token']['total'] / 1e6:.3f} uJ/token sparse vs "
                     f"{row['dense']['energy_pj_per_token']['total'] / 1e6:.3f} dense, "
                     f"{row['sparse']['latency_cycles_per_token']:,.0f} vs {row['dense']['latency_cycles_per_token']:,.0f} cycles")
    if speed and "ort_tokens_per_s" in speed:
        sp = speed
        lines.append(f"speed: {sp['simulated_tokens_per_s']:.1f} simulated tokens/s, ORT {sp['ort_tokens_per_s']:.1f} "
                     f"tokens/s ({sp['slowdown_vs_ort']:.1f}x slower)")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    s, d = report["sparse"], report["dense"]
    out = ["# sparsecc simulation", "", summary(report).replace("\n", "\n\n"), ""]
    if report.get("host_nodes"):
        out += ["Run on the host, not in these figures: " + ", ".join(
            f"`{node}` ({reason.split(':')[0]})" for node, reason in sorted(report["host_nodes"].items())), ""]
    out += ["| per token | sparse | dense | dense/sparse |", "|---|---|---|---|"]
    for key in ("npe", "memory", "controller", "noc", "total"):
        a, b = s["energy_pj_per_token"].get(key, 0.0), d["energy_pj_per_token"].get(key, 0.0)
        out.append(f"| energy {key} (pJ) | {a:,.0f} | {b:,.0f} | {b / a if a else float('nan'):.2f} |")
    for key, label in (("latency_cycles_per_token", "latency (cycles)"), ("busiest_core_cycles_per_token", "busiest core (cycles)")):
        out.append(f"| {label} | {s[key]:,.0f} | {d[key]:,.0f} | {d[key] / s[key]:.2f} |")
    for key in ("mac_lane_ops", "events_sent", "flit_hops"):
        out.append(f"| {key.replace('_', ' ')} (window) | {s[key]:,} | {d[key]:,} | {d[key] / max(1, s[key]):.2f} |")
    if "compensation" in s:   # low-rank compensation: part of the sparse figures, absent from the dense baseline
        c = s["compensation"]
        out.append(f"| of which low-rank compensation: energy (pJ), MAC lane-ops | {c['energy_pj_per_token']['total']:,.0f} "
                   f"({_pct(c['energy_share'])}), {c['mac_lane_ops']:,} | - | - |")
    out += ["", "## Per layer (pJ per token, sparse)", "", "| layer | npe | memory | controller | noc | total |", "|---|---|---|---|---|---|"]
    for name, row in s["per_layer"].items():
        out.append(f"| {name} | " + " | ".join(f"{row.get(k, 0.0):,.0f}" for k in ("npe", "memory", "controller", "noc", "total")) + " |")
    out += ["", f"Per-core figures for all {len(s['per_core'])} cores are in report.json."]
    if "state" in report:
        out += _state_markdown(report)
    return "\n".join(out) + "\n"


def _state_markdown(report: dict) -> list[str]:
    """A step graph's resident state, and the per-token cost at context positions."""
    st = report["state"]
    out = ["", "## State (step graph, resident in core data memory)", "",
           f"{st['format']}; each state on the core that writes it.", "",
           "| core | states | bytes at start | bytes at end | other bytes | fits | fits up to context |", "|---|---|---|---|---|---|---|"]
    for core, row in st["per_core"].items():
        out.append(f"| {core} | {len(row['states'])} | {row['start_bytes']:,} | {row['end_bytes']:,} | {row['other_bytes']:,} "
                   f"| {'yes' if row['fits_at_end'] else 'no'} | {row['fits_up_to_context'] if row['fits_up_to_context'] is not None else 'any (fixed size)'} |")
    out += ["", "| role | states | bytes at start | bytes at end |", "|---|---|---|---|"]
    for role, row in st["per_role"].items():
        out.append(f"| {role} | {row['states']} | {row['start_bytes']:,} | {row['end_bytes']:,} |")
    out += ["", "| context | resident bytes | as exported | fits every core |", "|---|---|---|---|"]
    for context, row in st["by_context"].items():
        out.append(f"| {context} | {row['resident_bytes']:,} | {row['exported_bytes']:,} | "
                   f"{'yes' if row['fits'] else 'no: cores ' + ', '.join(map(str, row['cores_over']))} |")
    if report.get("positions"):
        out += ["", "## Per-token cost at context positions", "",
                "The state is brought to each position with ONNX Runtime on the same compiled graph (the dense "
                "baseline's with every threshold at 0), then the next tokens are simulated.", "",
                "| position | tokens | energy sparse (pJ/token) | energy dense | latency sparse (cycles) | latency dense "
                "| state bytes | argmax vs ort |", "|---|---|---|---|---|---|---|---|"]
        for row in report["positions"]:
            sp, de = row["sparse"], row["dense"]
            out.append(f"| {row['position']} | {row['tokens']} | {sp['energy_pj_per_token']['total']:,.0f} | "
                       f"{de['energy_pj_per_token']['total']:,.0f} | {sp['latency_cycles_per_token']:,.0f} | "
                       f"{de['latency_cycles_per_token']:,.0f} | {row['state_bytes']:,} | {_pct(row['vs_ort']['argmax_agreement'])} |")
    return out


def title(report: dict) -> str:
    return f"sparsecc simulate: {report['tokens']} tokens on {report['target']}"


def facts(report: dict) -> list[tuple[str, str]]:
    """The rows at the top of the report page."""
    s, d, r = report["sparse"], report["dense"], report["ratio"]
    rows = []
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
    return rows


def _simulated_sites(report: dict) -> list[_Site]:
    return [_Site(s["label"], s["layer"], s["head"], s["sparsity"], 0 if s["compensates"] else s["macs_per_token"],
                  s["macs_per_token"] * (1 - s["sparsity"])) for s in report["sites"]]


# how -> where the sparsity of each site comes from (the report fields)


def figures(report: dict) -> list[Figure]:
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
