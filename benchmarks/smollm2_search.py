"""SmolLM2-135M: every threshold-search method of sparsecc, and combinations, against uniform
thresholds, at the same model-wide effective-MAC sparsity targets (LM head dense).

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_search.py --targets 0.4 0.5 0.6 --eval-windows 64
    python benchmarks/smollm2_search.py --targets 0.5 --methods uniform allocate   # a subset

Every run: statistics from 32 x 256-token windows of valid.txt (calibration), perplexity on
evenly spread 256-token windows of test.txt (ONNX Runtime), against the dense model on the
same windows. Prints, per target and method: perplexity, its change from dense, the body
effective-MAC sparsity measured on test (compensation MACs counted), the search's forward
passes and the compile wall time (statistics come from the calibration cache once warm, so
the first method of a run pays for them).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from smollm2_setup import MODEL_DIR, load  # a sibling module: benchmarks run as scripts


def methods(get, windows: int, rank: int, steps: int) -> dict:
    """label -> (target -> the passes after discover-sites and insert-thresholds)."""
    def calibrate(s):
        return [get("calibrate-thresholds")(sparsity=s)]

    def allocate(s):
        return [get("allocate-sparsity")(sparsity=s, start=max(s - 0.2, 0.0), windows=windows)]

    def greedy(s):
        return [get("greedy-blocks")(sparsity=s, windows=windows)]

    def compensate():
        return [get("compensate-lowrank")(rank=rank)]

    def finetune():
        return [get("finetune-bands")(steps=steps, windows=16)]

    return {   # key: (label, passes)
        "uniform": ("uniform (one level)", calibrate),
        "greedy": ("greedy-blocks (TEAL)", greedy),
        "allocate": ("allocate-sparsity (by role)", allocate),
        "wina": ("weight-scores (WINA) + uniform", lambda s: [get("weight-scores")()] + calibrate(s)),
        "compensate": (f"compensate-lowrank r={rank} + uniform", lambda s: compensate() + calibrate(s)),
        "finetune": ("uniform + finetune-bands", lambda s: calibrate(s) + finetune()),
        "allocate+finetune": ("allocate + finetune-bands", lambda s: allocate(s) + finetune()),
        "greedy+finetune": ("greedy-blocks + finetune-bands", lambda s: greedy(s) + finetune()),
        "compensate+allocate+finetune": (f"compensate r={rank} + allocate + finetune",
                                         lambda s: compensate() + allocate(s) + finetune()),
    }


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.calibration import default_cache_dir
    from sparsecc.passes import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    ap.add_argument("--methods", nargs="+", help="keys of the methods to run (default all): " + ", ".join(methods(None, 1, 1, 1)))
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--search-windows", type=int, default=8, help="calibration windows a search's loss is measured on")
    ap.add_argument("--rank", type=int, default=32, help="rank of the low-rank compensation")
    ap.add_argument("--steps", type=int, default=80, help="finetune-bands steps (on 16 calibration windows)")
    args = ap.parse_args(argv)
    table = methods(get, args.search_windows, args.rank, args.steps)
    if args.methods:
        unknown = sorted(set(args.methods) - set(table))
        if unknown:
            raise SystemExit(f"unknown method {unknown[0]!r}; methods: {', '.join(table)}")
        table = {k: table[k] for k in args.methods}
    model, calib, test, dense = load(args.model_dir, args.calib_windows, args.eval_windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            for label, make in table.values():
                out = Path(tmp) / f"{target}-{len(rows)}"
                start = time.perf_counter()
                result = sparsecc.compile_model(model, [get("discover-sites")(), get("insert-thresholds")(), *make(target)],
                                                calib, out=out, cache_dir=default_cache_dir())
                seconds = time.perf_counter() - start
                passes = sum(p["details"].get("search", {}).get("forward_passes", 0) for p in result.report["passes"])
                r = sparsecc.evaluate(out / "model.onnx", test)["result"]
                rows.append((target, label, r["perplexity"], r["macs"]["body"]["sparsity"], passes, seconds))
                print(f"{target:.0%} {label}: ppl {r['perplexity']:.3f} ({r['perplexity'] / dense - 1:+.1%}), "
                      f"body {r['macs']['body']['sparsity']:.1%}, {seconds:.0f} s", flush=True)
    print(f"\nSmolLM2-135M, perplexity on {len(test)} x 256 tokens of test.txt (dense {dense:.3f})")
    print("| target | method | ppl | vs dense | body sparsity (test) | search passes | compile s |")
    print("|---|---|---|---|---|---|---|")
    for target, label, ppl, body, passes, seconds in rows:
        print(f"| {target:.0%} | {label} | {ppl:.3f} | {ppl / dense - 1:+.1%} | {body:.1%} | {passes} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
