"""The simulation report: totals of the sparse and dense runs, and the check against ONNX Runtime."""
from __future__ import annotations

import collections

import numpy as np

from sparsecc import ops
from sparsecc.backends.seneca.target import Target
from sparsecc.site_names import site_labels, site_layers
from sparsecc.sites import analyze


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
