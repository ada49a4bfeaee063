"""The seneca simulator on step graphs: token by token, each state resident in a core's memory.

A window of T tokens runs as T simulator steps of one token each, from the step graph's
initial state (`sparsecc.stepgraph`), each step's `new_state.i` fed back as `state.i`; the
sparse run and the dense baseline each carry their own state. ONNX Runtime (a `StepSession`
on the same compiled graph, as written) gives the reference logits of the same tokens.

Where each state lives and what reading, writing and sending it costs is the simulator's
(see simulator.py): MLD/MST/EVC of the handlers on its home core, events on the NoC to
readers elsewhere, all priced from the target file. The report's `state` section gives, per
core and per role, the state bytes at the start and end of the run (16-bit words, as the
partition pass places every value; the exported graph keeps float32), the totals as a
function of context length (StepSpec.state_bytes) and whether each core still holds its
state at those lengths.

Per-token cost at context position P (`positions`): simulating P tokens first is slow for a
large model, so the state is brought to position P by ONNX Runtime on the same compiled
graph fed the data's first P tokens (for the dense baseline, the graph with every threshold
at 0: what the baseline computes), and `count` tokens are simulated from there. The report
says so (`state_warmed_with: ort`).
"""
from __future__ import annotations

import collections
import contextlib
import re
import time
from pathlib import Path

import numpy as np

from sparsecc import model_io, ops
from sparsecc.backends.seneca.placement import WORD
from sparsecc.backends.seneca.program import Image
from sparsecc.backends.seneca.simulator import Simulator, StepResult
from sparsecc.backends.seneca.summary import Agreement, _summary, simulation_report, step_functions
from sparsecc.backends.seneca.target import Target
from sparsecc.errors import SparseccError
from sparsecc.progress import bar, log
from sparsecc.runtime import ort_session
from sparsecc.stepgraph import LOGITS, TOKEN, StepSpec, read_spec, state_input, state_output

CONTEXTS = (64, 512)   # context lengths the state section always reports
_LAYER_PREFIX = re.compile(r"^layer \d+ ")


def next_state(result: StepResult, spec: StepSpec) -> dict[str, np.ndarray]:
    """The state a step leaves for the next: its new_state.i as state.i."""
    return {state_input(i): result.outputs[state_output(i)] for i in range(len(spec.states))}


def run_tokens(sim: Simulator, spec: StepSpec, tokens, state: dict[str, np.ndarray] | None = None,
               **options) -> tuple[list[StepResult], dict[str, np.ndarray]]:
    """`tokens` one step each from `state` (default: the initial state); (results, final state).
    `options` (keep, decisions) go to every step; `decisions` as a function of the step index."""
    state = spec.initial_state() if state is None else state
    decide = options.pop("decisions", None)
    results = []
    for t, token in enumerate(tokens):
        feed = {TOKEN: np.array([[token]], dtype=np.int64), **state}
        result = sim.run(feed, **options, **({"decisions": decide(t)} if decide is not None else {}))
        results.append(result)
        state = next_state(result, spec)
    return results, state


def ort_state(session, spec: StepSpec, tokens) -> dict[str, np.ndarray]:
    """The state ONNX Runtime (a raw session on the step graph) reaches after `tokens`."""
    names = [state_output(i) for i in range(len(spec.states))]
    state = spec.initial_state()
    for token in tokens:
        values = session.run(names, {TOKEN: np.array([[token]], dtype=np.int64), **state})
        state = {state_input(i): v for i, v in enumerate(values)}
    return state


def ort_logits(session, spec: StepSpec, tokens, state: dict[str, np.ndarray]) -> np.ndarray:
    """Logits [1, T, vocab] of a raw session fed `tokens` from `state`."""
    names = [LOGITS] + [state_output(i) for i in range(len(spec.states))]
    out = []
    for token in tokens:
        values = session.run(names, {TOKEN: np.array([[token]], dtype=np.int64), **state})
        out.append(values[0])
        state = {state_input(i): v for i, v in enumerate(values[1:])}
    return np.concatenate(out, axis=1)


def simulate_steps(out_dir: Path, model, target: Target, image: Image, source, compare: bool, positions=(),
                   position_source=None, position_tokens: int = 2) -> dict:
    """`simulation.simulate` for a step graph."""
    spec = read_spec(model)
    sparse, dense = Simulator(model, target, image=image), Simulator(model, target, dense_baseline=True, image=image)
    sites = list(sparse.sites.values())
    thresholds, quantizers = step_functions(sparse)
    steps = thresholds + quantizers
    runs = {"sparse": [], "dense": []}
    sim_seconds, ort_seconds, ort_macs, pinned_macs, tokens = 0.0, 0.0, 0, 0, 0
    own, pinned = Agreement(), Agreement()
    extra = sorted({s.consumes for s in sites} | {y for _, y, _ in steps})
    start_state = end_state = spec.initial_state()
    window_length = 0
    with contextlib.ExitStack() as stack:
        if compare:   # a StepSession: the window's tokens one by one; extra tensors stacked per step
            session = stack.enter_context(ort_session(model, extra, optimize=False))
            fast = stack.enter_context(ort_session(model))
        names = [o.name for o in session.get_outputs()] if compare else []
        for feed in bar(source.feeds([TOKEN]), total=len(source), desc="simulating"):
            ids = np.asarray(feed[TOKEN]).reshape(-1)
            begin = time.perf_counter()
            results, end_state = run_tokens(sparse, spec, ids)
            sim_seconds += time.perf_counter() - begin
            runs["sparse"] += results
            runs["dense"] += run_tokens(dense, spec, ids)[0]
            tokens += len(ids)
            window_length = max(window_length, len(ids))
            if not compare:
                continue
            window = {TOKEN: ids[None].astype(np.int64)}
            begin = time.perf_counter()
            fast.run([LOGITS], window)
            ort_seconds += time.perf_counter() - begin
            acts = dict(zip(names, session.run(names, window)))   # logits [1, T, V]; others [T, ...]
            ort_macs += sum(int(np.count_nonzero(acts[s.consumes])) * s.out_features for s in sites)
            own.add(np.concatenate([r.outputs[LOGITS] for r in results], axis=1), acts[LOGITS])
            # the same tokens with every threshold and quantizer deciding as ORT did at that step
            same, _ = run_tokens(sparse, spec, ids, keep=tuple(x for x, _, _ in steps),
                                 decisions=lambda t: {y: acts[y][t] for _, y, _ in steps})
            pinned.add(np.concatenate([r.outputs[LOGITS] for r in same], axis=1), acts[LOGITS])
            pinned_macs += sum(r.mac_lane_ops for r in same)
            for t, r in enumerate(same):
                for x, y, level in thresholds:
                    pinned.add_decisions(r.outputs[x], acts[y][t], level)
                for x, y, node in quantizers:
                    pinned.add_quantized(r.outputs[x], acts[y][t], *[sparse.constants.get(v.name) if v is not None else None
                                                                     for v in node.inputs[1:3]])
    if not runs["sparse"]:
        raise SparseccError("no windows to simulate; give more text or fewer --tokens")
    report = simulation_report(sparse, target, runs, len(source), tokens, sim_seconds,
                               (own, pinned, ort_macs, pinned_macs, ort_seconds) if compare else None)
    report["step_graph"] = {"arch": spec.arch, "states": len(spec.states), "tokens_per_step": 1}
    measured = []
    if positions:
        measured = per_position(out_dir, model, sparse, dense, spec, position_source, tuple(positions), position_tokens)
        report["positions"] = measured
    ends = [row["position"] + row["tokens"] for row in measured]
    report["state"] = state_report(sparse, spec, start_state, end_state, window_length, [*positions, *ends])
    return report


def per_position(out_dir: Path, model, sparse: Simulator, dense: Simulator, spec: StepSpec, source,
                 positions: tuple[int, ...], count: int) -> list[dict]:
    """Per-token cost of `count` tokens from each context position, state warmed with ORT."""
    if source is None:
        raise SparseccError("per-position costs need data: pass the text to take the tokens from")
    if count < 1 or any(p < 0 for p in positions):
        raise SparseccError(f"positions must be >= 0 and tokens per position >= 1 (got {list(positions)}, {count})")
    ids = np.asarray(next(iter(source.feeds([TOKEN])))[TOKEN]).reshape(-1)
    need = max(positions) + count
    if len(ids) < need:
        raise SparseccError(f"position {max(positions)} + {count} tokens needs a window of {need} tokens, the data's "
                            f"first has {len(ids)}; give more text or lower --positions")
    baseline = model_io.load_model(out_dir / "model.onnx")   # what the dense baseline computes: thresholds at 0
    for node in baseline.graph:
        if ops.is_threshold(node):
            ops.set_threshold(node, 0.0)
    rows = []
    with ort_session(model, optimize=False) as s_ort, ort_session(baseline, optimize=False) as d_ort:
        for position in positions:
            log(f"position {position}: state warmed with ONNX Runtime, then {count} simulated token(s)")
            sparse_state = ort_state(s_ort.session, spec, ids[:position])
            dense_state = ort_state(d_ort.session, spec, ids[:position])
            tokens = ids[position:position + count]
            s_runs, _ = run_tokens(sparse, spec, tokens, sparse_state)
            d_runs, _ = run_tokens(dense, spec, tokens, dense_state)
            check = Agreement()
            check.add(np.concatenate([r.outputs[LOGITS] for r in s_runs], axis=1),
                      ort_logits(s_ort.session, spec, tokens, sparse_state))
            s_sum, d_sum = _brief(_summary(s_runs, sparse.target)), _brief(_summary(d_runs, dense.target))
            rows.append({
                "position": position, "tokens": count, "state_warmed_with": "ort",
                "sparse": s_sum, "dense": d_sum,
                "ratio": {"energy": d_sum["energy_pj_per_token"]["total"] / s_sum["energy_pj_per_token"]["total"],
                          "latency": d_sum["latency_cycles_per_token"] / s_sum["latency_cycles_per_token"]},
                "state_bytes": sum(sparse.placement.state_bytes(position).values()),
                "vs_ort": check.summary()})
    return rows


def _brief(summary: dict) -> dict:
    keep = ("energy_pj_per_token", "latency_cycles_per_token", "latency_s_per_token", "busiest_core_cycles_per_token",
            "events_sent", "flit_hops", "mac_lane_ops", "dense_macs")
    return {k: summary[k] for k in keep}


def _bytes(state: dict[str, np.ndarray], name: str) -> int:
    return int(np.size(state[name])) * WORD


def state_report(sim: Simulator, spec: StepSpec, start: dict[str, np.ndarray], end: dict[str, np.ndarray],
                 run_length: int, positions: list[int]) -> dict:
    """Where the state lives, how big it is at the start and end of the run (measured on the
    simulated state) and as a function of context length, and whether it fits its cores."""
    placement = sim.placement
    memory = placement.memory
    per_core: dict[int, dict] = {}
    per_role: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_state = []
    for st in placement.states:
        a, b = _bytes(start, st.input), _bytes(end, st.input)
        row = per_core.setdefault(st.core, {"states": [], "start_bytes": 0, "end_bytes": 0})
        row["states"].append(st.input)
        row["start_bytes"] += a
        row["end_bytes"] += b
        kind = _LAYER_PREFIX.sub("", st.role)
        per_role[kind].update({"states": 1, "start_bytes": a, "end_bytes": b})
        readers = sorted({c for r in sim.consumers.get(st.input, []) if r.name in sim.live for c in sim.cores[r.name]}
                         - {st.core})
        per_state.append({"input": st.input, "role": st.role, "core": st.core, "start_bytes": a, "end_bytes": b,
                          "bytes_per_position": st.bytes_per_position, "read_on_other_cores": readers})
    fits_up_to = placement.fits_up_to()
    usable = placement.usable_bytes
    for core, row in per_core.items():
        others = sum(v for c, v in memory.get(core, {}).items() if c != "step_state")
        row |= {"other_bytes": others, "usable_bytes": usable, "fits_at_end": others + row["end_bytes"] <= usable,
                "fits_up_to_context": fits_up_to[core]}

    def at(past: int) -> dict:
        over = [core for core, b in placement.state_bytes(past).items()
                if per_core[core]["other_bytes"] + b > usable]
        return {"exported_bytes": spec.state_bytes(past), "resident_bytes": sum(placement.state_bytes(past).values()),
                "fits": not over, "cores_over": over}

    contexts = sorted({0, run_length, *CONTEXTS, *positions})
    growing = [n for n in fits_up_to.values() if n is not None]
    return {
        "word_bytes": WORD, "format": "16-bit words in core data memory (the exported graph keeps float32)",
        "grows": any(s.grow_axis is not None for s in spec.states),
        "bytes_per_position": sum(st.bytes_per_position for st in placement.states),
        "fits_up_to_context": min(growing) if growing else None,
        "run_positions": run_length,
        "per_core": {str(core): per_core[core] for core in sorted(per_core)},
        "per_role": {kind: dict(row) for kind, row in per_role.items()},
        "per_state": per_state,
        "by_context": {str(p): at(p) for p in contexts},
    }
