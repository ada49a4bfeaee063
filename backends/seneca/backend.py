"""The `seneca` backend: core programs for a SENECA-style mesh, and their simulation.

`lower` writes, beside the compiled model:
    placement.json          which core holds which tiles and runs which nodes
    target.toml             the target description it was compiled for (`simulate` reads it)
    cores/core_NNNN.s       one assembly listing per used core: its handlers for one token step
    program.bin             every handler assembled to 32-bit words, core by core
    manifest.json           where each core's handlers lie in program.bin (word offsets)
Dense handlers' loop counts depend on the attention context; the listings show them for a
window of `LISTING_TOKENS` tokens (a step graph: one token, a KV cache of that many positions).
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsecc.backends.base import Backend
from sparsecc.errors import SparseccError
from sparsecc.isa import assemble, encode
from sparsecc.target import Target, load_target

LISTING_TOKENS = 8
MANIFEST = "sparsecc.program/1"


class SenecaBackend(Backend):
    name = "seneca"
    description = "SENECA-style event-driven cores: placement, per-core programs, instruction-level simulator"
    requires = ("partition",)

    def target(self, model: ir.Model) -> Target:
        from sparsecc.placement import Placement

        return load_target(Placement.of(model).target)

    def declines(self, model: ir.Model) -> dict[str, str]:
        from sparsecc.backends.seneca.simulator import host_nodes

        return host_nodes(model)

    def lower(self, model: ir.Model, out_dir: Path) -> dict:
        from sparsecc.backends.seneca.simulator import Simulator

        target = self.target(model)
        sim = Simulator(model, target)
        sim.run(dummy_feeds(model.graph, LISTING_TOKENS))
        handlers: dict[int, list[tuple[str, str, str]]] = collections.defaultdict(list)   # core -> (node, kind, text)
        for node in sim.nodes:
            for w in sim.work.get(node.name, []):
                handlers[w.core].append((node.name, "linear" if node.name in sim.tiles else node.op_type, w.program))
        (out_dir / "cores").mkdir()
        image, manifest = bytearray(), {"schema": MANIFEST, "word_bytes": 4, "cores": {}}
        for core in sorted(handlers):
            listing = [f"; core {core} (x={core % sim.placement.cols}, y={core // sim.placement.cols}): "
                       f"{len(handlers[core])} handlers, one token step each\n"]
            entries = []
            for name, kind, text in handlers[core]:
                words = encode(assemble(text))
                entries.append({"node": name, "kind": kind, "offset": len(image) // 4, "words": len(words) // 4})
                image += words
                listing.append(text)
            (out_dir / "cores" / f"core_{core:04d}.s").write_text("\n".join(listing), encoding="utf-8")
            manifest["cores"][str(core)] = entries
        (out_dir / "program.bin").write_bytes(bytes(image))
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        (out_dir / "target.toml").write_bytes(target.path.read_bytes())
        (out_dir / "placement.json").write_text(sim.placement.to_json() + "\n", encoding="utf-8")
        return {"cores": len(handlers), "handlers": sum(len(h) for h in handlers.values()),
                "program_words": len(image) // 4, "listing_tokens": LISTING_TOKENS}


def dummy_feeds(graph: ir.Graph, tokens: int) -> dict[str, np.ndarray]:
    """Inputs of `tokens` positions (token id 1, mask 1) for tracing shapes."""
    feeds = {}
    for value in graph.inputs:
        dims = [d if isinstance(d, int) else (1 if i == 0 else tokens) for i, d in enumerate(value.shape or [1, tokens])]
        dtype = value.dtype.numpy() if value.dtype is not None else np.int64
        feeds[value.name] = np.ones(dims, dtype)
    return feeds


def check_compiled(out_dir: Path) -> None:
    """Fail in one line unless `out_dir` was written by compile --target seneca."""
    for needed in ("model.onnx", "target.toml", "placement.json"):
        if not (out_dir / needed).is_file():
            raise SparseccError(f"{out_dir} has no {needed}: simulate reads a folder written by "
                                "`sparsecc compile ... --target seneca -o DIR`")


def simulate(out_dir: Path, source, compare: bool = True, positions: tuple[int, ...] = (),
             position_source=None, position_tokens: int = 2) -> dict:
    """Simulate the compiled model in `out_dir` (written by compile --target seneca) on every
    window of `source`, sparse and dense baseline; with `compare`, check against the `ort`
    backend on the same model and tokens. Returns the report (plain JSON values).

    A step graph runs token by token with its state resident in core memory (`steps`); for
    it, `positions` also measures the per-token cost of `position_tokens` tokens at each of
    those context positions of the first window of `position_source`."""
    import contextlib
    import time

    from sparsecc import model_io
    from sparsecc.backends.seneca.simulator import Simulator
    from sparsecc.progress import bar
    from sparsecc.runtime import ort_session
    from sparsecc.stepgraph import is_step_graph

    out_dir = Path(out_dir)
    check_compiled(out_dir)
    model = model_io.load_model(out_dir / "model.onnx")
    target = load_target(out_dir / "target.toml")
    if is_step_graph(model):
        from sparsecc.backends.seneca.steps import simulate_steps

        return simulate_steps(out_dir, model, target, source, compare, positions, position_source, position_tokens)
    if positions:
        raise SparseccError("--positions measures step graphs (sparsecc export) only; this model takes whole windows")
    sparse, dense = Simulator(model, target), Simulator(model, target, dense_baseline=True)
    sites = list(sparse.sites.values())
    thresholds, quantizers = step_functions(sparse)
    steps = thresholds + quantizers     # (input, output, t or node): the step functions
    runs = {"sparse": [], "dense": []}
    sim_seconds, ort_seconds, ort_macs, pinned_macs, tokens = 0.0, 0.0, 0, 0, 0
    own, pinned = Agreement(), Agreement()
    inputs = [v.name for v in model.graph.inputs]
    extra = sorted({s.consumes for s in sites} | {y for _, y, _ in steps})
    with contextlib.ExitStack() as stack:
        if compare:  # checked against the graph as written (ORT's fusions change the numerics); timed at its best
            session = stack.enter_context(ort_session(model, extra, optimize=False))
            fast = stack.enter_context(ort_session(model))
        names = [o.name for o in session.get_outputs()] if compare else []
        for feed in bar(source.feeds(inputs), total=len(source), desc="simulating"):
            start = time.perf_counter()
            result = sparse.run(feed)
            sim_seconds += time.perf_counter() - start
            runs["sparse"].append(result)
            runs["dense"].append(dense.run(feed))
            if compare:
                start = time.perf_counter()
                fast.run(names[:1], feed)
                ort_seconds += time.perf_counter() - start
                got = session.run(names, feed)
                acts = dict(zip(names, got))
                ort_macs += sum(int(np.count_nonzero(acts[s.consumes])) * s.out_features for s in sites)
                own.add(result.outputs[names[0]], got[0])
                # the same step with every threshold and quantizer deciding as ORT did: isolates the arithmetic
                same = sparse.run(feed, keep=tuple(x for x, _, _ in steps), decisions={y: acts[y] for _, y, _ in steps})
                pinned.add(same.outputs[names[0]], got[0])
                pinned_macs += same.mac_lane_ops
                for x, y, t in thresholds:
                    pinned.add_decisions(same.outputs[x], acts[y], t)
                for x, y, node in quantizers:
                    pinned.add_quantized(same.outputs[x], acts[y], *[sparse.constants.get(v.name) if v is not None else None
                                                                     for v in node.inputs[1:3]])
            tokens += result.tokens
    return simulation_report(sparse, target, runs, len(runs["sparse"]), tokens, sim_seconds,
                             (own, pinned, ort_macs, pinned_macs, ort_seconds) if compare else None)


def simulation_report(sparse, target: Target, runs: dict, windows: int, tokens: int, sim_seconds: float,
                      checked: tuple | None) -> dict:
    """The simulation report from the sparse and dense runs and, when checked against ORT,
    (own decisions, ORT's decisions, ORT's effective MACs, MACs with ORT's decisions, ORT seconds)."""
    report = {"schema": "sparsecc.simulation/1", "target": target.name, "tokens": tokens, "windows": windows,
              "sparse": _summary(runs["sparse"], target), "dense": _summary(runs["dense"], target),
              "sites": _site_sparsity(sparse, runs["sparse"])}
    if sparse.host:   # declined at compile: values from the reference, cost left out of every figure
        report["host_nodes"] = sparse.host
    s, d = report["sparse"], report["dense"]
    report["ratio"] = {"energy": d["energy_pj_per_token"]["total"] / s["energy_pj_per_token"]["total"],
                       "latency": d["latency_cycles_per_token"] / s["latency_cycles_per_token"],
                       "effective_macs": d["mac_lane_ops"] / max(1, s["mac_lane_ops"])}
    report["speed"] = {"simulated_tokens_per_s": tokens / sim_seconds}
    if checked is not None:
        own, pinned, ort_macs, pinned_macs, ort_seconds = checked
        report["vs_ort"] = own.summary() | {
            "ort_effective_macs": ort_macs, "simulator_mac_lane_ops": s["mac_lane_ops"],
            "mac_difference": (s["mac_lane_ops"] - ort_macs) / max(1, ort_macs),
            "with_ort_decisions": pinned.summary() | {"simulator_mac_lane_ops": pinned_macs,
                                                      "mac_difference": (pinned_macs - ort_macs) / max(1, ort_macs)}}
        report["speed"]["ort_tokens_per_s"] = tokens / ort_seconds
        report["speed"]["slowdown_vs_ort"] = ort_seconds and sim_seconds / ort_seconds
    return report


def step_functions(sim) -> tuple[list, list]:
    """(thresholds as (input, output, t), live quantizers as (input, output, node)) of a simulator's model."""
    from sparsecc import ops

    thresholds = [(n.inputs[0].name, n.outputs[0].name, n.inputs[1].const_value.numpy()) for n in sim.nodes
                  if ops.is_threshold(n)]
    quantizers = [(n.inputs[0].name, n.outputs[0].name, n) for n in sim.nodes
                  if n.op_type == "QuantizeLinear" and n.name in sim.live]
    return thresholds, quantizers


class Agreement:
    """Simulator logits against ORT's, accumulated over windows.

    A Threshold is a step, and so is a QuantizeLinear: a value within rounding of a step goes
    one way in one run and the other way in another, and the difference grows downstream (ORT
    disagrees with itself this way when its graph optimizations reorder float32 sums). So the
    check also runs with ORT's decisions, and counts the simulator's own decisions that differ
    from them: for thresholds with the largest distance |x| - t among those, relative to t
    (small: every difference is a near tie), for quantizers the largest difference in steps."""

    def __init__(self):
        self.tokens = self.agree = self.decisions = self.differing = self.quantized = self.requantized = 0
        self.err = self.scale = self.mismatch_gap = self.tie_margin = 0.0
        self.max_steps = 0

    def add(self, sim: np.ndarray, ref: np.ndarray) -> None:
        hit = sim.argmax(-1) == ref.argmax(-1)
        self.tokens += hit.size
        self.agree += int(hit.sum())
        self.err = max(self.err, float(np.abs(sim - ref).max()) if np.isfinite(sim).all() else float("inf"))
        self.scale = max(self.scale, float(np.abs(ref).max()))
        top2 = np.sort(ref, axis=-1)[..., -2:]
        gaps = (top2[..., 1] - top2[..., 0])[~hit]
        self.mismatch_gap = max(self.mismatch_gap, float(gaps.max()) if gaps.size else 0.0)

    def add_decisions(self, x_sim: np.ndarray, y_ref: np.ndarray, t) -> None:
        """`x_sim`: a Threshold's input in the simulator; `y_ref`: its output in ORT."""
        t = np.broadcast_to(t, x_sim.shape)   # a weight-aware threshold has one t per channel
        differ = (np.abs(x_sim) > t) != (y_ref != 0)
        self.decisions += x_sim.size
        self.differing += int(differ.sum())
        differ &= t > 0
        if differ.any():
            self.tie_margin = max(self.tie_margin, float((np.abs(np.abs(x_sim[differ]) - t[differ]) / t[differ]).max()))

    def add_quantized(self, x_sim: np.ndarray, q_ref: np.ndarray, scale, zero=None) -> None:
        """`x_sim`: a QuantizeLinear's input in the simulator; `q_ref`: its output in ORT."""
        info = np.iinfo(q_ref.dtype)
        zero = 0 if zero is None else zero.astype(np.int64)
        own = np.clip(np.rint(x_sim / scale) + zero, info.min, info.max).astype(np.int64)
        steps = np.abs(own - q_ref.astype(np.int64))
        self.quantized += steps.size
        self.requantized += int(np.count_nonzero(steps))
        self.max_steps = max(self.max_steps, int(steps.max(initial=0)))

    def summary(self) -> dict:
        out = {"argmax_agreement": self.agree / max(1, self.tokens), "max_abs_logit_diff": self.err,
               "max_abs_logit": self.scale, "largest_top2_gap_at_mismatch": self.mismatch_gap}
        if self.decisions:
            out |= {"threshold_decisions": self.decisions, "decisions_differing": self.differing,
                    "largest_relative_margin_at_difference": self.tie_margin}
        if self.quantized:
            out |= {"quantized_values": self.quantized, "quantized_differing": self.requantized,
                    "largest_step_difference": self.max_steps}
        return out


def _summary(results: list, target: Target) -> dict:
    """Totals over windows, per token where it says so."""
    tokens = sum(r.tokens for r in results)
    energy, compensation = collections.Counter(), collections.Counter()
    per_layer: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_core: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    flits_per_core: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        energy.update(r.energy_pj)
        compensation.update(r.compensation_pj)
        for name, row in r.per_layer.items():
            per_layer[name].update(row)
        for core, row in r.per_core.items():
            per_core[core].update(row)
        for core, row in r.core_flits.items():
            flits_per_core[core].update(row)
    latency = float(np.concatenate([r.latency_cycles for r in results]).mean())
    total = sum(energy.values())
    clock = target["clock"]["frequency_hz"]

    def per_token(row):
        return {k: v / tokens for k, v in sorted(row.items())} | {"total": sum(v for k, v in row.items() if k != "cycles") / tokens}

    busiest = max(per_core.values(), key=lambda row: row["cycles"])["cycles"] / tokens if per_core else 0.0
    return {
        "energy_pj_per_token": {k: energy[k] / tokens for k in sorted(energy)} | {"total": total / tokens},
        "energy_share": {k: energy[k] / total for k in sorted(energy)},
        "latency_cycles_per_token": latency, "latency_s_per_token": latency / clock,
        "busiest_core_cycles_per_token": busiest,
        "events_sent": sum(r.events_sent for r in results), "events_received": sum(r.events_received for r in results),
        "flits": sum(r.flits for r in results), "flit_hops": sum(r.flit_hops for r in results),
        "mac_lane_ops": sum(r.mac_lane_ops for r in results), "dense_macs": sum(r.dense_macs for r in results),
        "instructions": dict(sorted(sum((r.counts for r in results), collections.Counter()).items())),
        "per_layer": {name: per_token(row) for name, row in sorted(per_layer.items(), key=lambda kv: _layer_key(kv[0]))},
        "per_core": {str(core): per_token(row) for core, row in sorted(per_core.items())},
        # NoC traffic by core over the window(s), as `flits`; a multicast packet is received by each destination
        "flits_per_core": {str(core): {"sent": row["sent"], "received": row["received"]}
                           for core, row in sorted(flits_per_core.items())},
        "mesh": {"rows": target["mesh"]["rows"], "cols": target["mesh"]["cols"]},
    } | ({"compensation": {   # low-rank compensation (compensate-lowrank): its part of the figures above
        "energy_pj_per_token": {k: compensation[k] / tokens for k in sorted(compensation)} | {
            "total": sum(compensation.values()) / tokens},
        "energy_share": sum(compensation.values()) / total,
        "mac_lane_ops": sum(r.compensation_mac_lane_ops for r in results)}} if compensation else {})


def _site_sparsity(sim, results: list) -> list[dict]:
    """Every linear site's input sparsity as the simulation measured it (the events its tiles
    read, over every window), with its label and layer (sparsecc.site_names)."""
    from sparsecc.site_names import site_labels, site_layers
    from sparsecc.sites import analyze

    analysis = analyze(sim.graph)
    labels, layers = site_labels(sim.graph, analysis), site_layers(analysis.sites)
    zeros: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for r in results:
        for name, (z, n) in r.site_zeros.items():
            zeros[name][0] += z
            zeros[name][1] += n
    return [{"site": s.node, "label": labels[s.index], "layer": layers.get(s.index), "head": s.head,
             "compensates": s.compensates, "macs_per_token": s.macs_per_token,
             "sparsity": zeros[s.node][0] / zeros[s.node][1]} for s in analysis.sites if zeros[s.node][1]]


def _layer_key(name: str):
    return (0, int(name.split()[-1])) if name.startswith("layer ") else (1, 0)
