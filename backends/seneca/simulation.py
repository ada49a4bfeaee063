"""Simulating a compile folder written by `compile --target seneca`: the model, placement and
target it holds, and the program image (`program.Image`) the simulator costs every handler from.
A step graph runs token by token (`steps`)."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from sparsecc import model_io
from sparsecc.backends.seneca.program import Image
from sparsecc.backends.seneca.simulator import Simulator
from sparsecc.backends.seneca.steps import simulate_steps
from sparsecc.backends.seneca.summary import Agreement, simulation_report, step_functions
from sparsecc.backends.seneca.target import load_target
from sparsecc.errors import SparseccError
from sparsecc.progress import bar
from sparsecc.runtime import ort_session
from sparsecc.stepgraph import is_step_graph


def check_compiled(out_dir: Path) -> None:
    """Fail in one line unless `out_dir` was written by compile --target seneca."""
    for needed in ("model.onnx", "target.toml", "placement.json", "program.bin", "manifest.json"):
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
    out_dir = Path(out_dir)
    check_compiled(out_dir)
    model = model_io.load_model(out_dir / "model.onnx")
    target = load_target(out_dir / "target.toml")
    image = Image.load(out_dir)
    if is_step_graph(model):
        return simulate_steps(out_dir, model, target, image, source, compare, positions, position_source, position_tokens)
    if positions:
        raise SparseccError("--positions measures step graphs (sparsecc export) only; this model takes whole windows")
    sparse, dense = Simulator(model, target, image=image), Simulator(model, target, dense_baseline=True, image=image)
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
