"""SmolLM2-135M at several sparsity targets: calibrated on WikiText-2 valid, measured on test.

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_sparsity.py --targets 0.4 0.5 --eval-windows 128
    python benchmarks/smollm2_sparsity.py --targets 0.5 --refine 0 1   # what refinement buys

For each target: `sparsecc compile` (default pipeline, 64 x 256-token calibration windows of
valid.txt), then `sparsecc eval` on evenly spread 256-token windows of test.txt against the
dense model on the same windows. Prints target vs measured effective-MAC sparsity (body =
every linear site but the LM head, which stays dense), perplexity, and output error. With
several `--refine` values each target is compiled with each, and the thresholds of each
refine are compared with the first one's (relative change of t, median and largest).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.calibration import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "build" / "smollm2-135m")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--mode", default="mac-weighted", choices=["mac-weighted", "uniform"])
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=128, help="0: the whole test set")
    ap.add_argument("--refine", type=int, nargs="+", default=[1], help="calibrate-thresholds refine values")
    args = ap.parse_args(argv)

    model = args.model_dir / "model.onnx"
    calib = sparsecc.data_source(DATA / "valid.txt", args.model_dir, 256, args.calib_windows)
    test = sparsecc.data_source(DATA / "test.txt", args.model_dir, 256, args.eval_windows or None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            first = None
            for refine in args.refine:
                start = time.perf_counter()
                out = Path(tmp) / f"s{target}-r{refine}"
                result = sparsecc.compile_model(model, sparsecc.default_pipeline(sparsity=target, mode=args.mode,
                                                                                refine=refine),
                                                calib, out=out, cache_dir=default_cache_dir())
                compiled = time.perf_counter() - start
                ts = threshold_levels(result.report)
                first = first or ts
                r = sparsecc.evaluate(out / "model.onnx", test, reference=model)["result"]
                rows.append((target, refine, r, compiled, relative_change(ts, first)))
                print(f"target {target:.2f} refine {refine} done: compile {compiled:.0f} s", flush=True)
    print(f"\nSmolLM2-135M, {args.mode} thresholds; eval: {len(test)} x 256 tokens of test.txt "
          f"({rows[0][1]['tokens']} predicted tokens)")
    print(f"{'target':>7} {'refine':>6} {'measured body':>14} {'with head':>10} {'ppl':>9} {'dense ppl':>10} "
          f"{'delta':>8} {'top-1':>7} {'cosine':>8} {'compile s':>10} {f't vs refine {args.refine[0]}':>22}")
    for target, refine, r, secs, change in rows:
        body, every, err = r["macs"]["body"]["sparsity"], r["macs"]["all"]["sparsity"], r["output_error"]
        print(f"{target:7.2f} {refine:6d} {100 * body:13.2f}% {100 * every:9.2f}% {r['perplexity']:9.3f} "
              f"{r['reference_perplexity']:10.3f} {100 * (r['perplexity'] / r['reference_perplexity'] - 1):+7.1f}% "
              f"{100 * err['top1_agreement']:6.1f}% {err['mean_cosine']:8.4f} {secs:10.0f} "
              f"{f'median {100 * change[0]:.2f}%, max {100 * change[1]:.2f}%':>22}")


def threshold_levels(report: dict) -> dict[str, float]:
    """Threshold name -> t, from a compile report's calibrate-thresholds details."""
    details = next(p["details"] for p in report["passes"] if p["pass"] == "calibrate-thresholds")
    return {row["threshold"]: row["t"] for row in details["thresholds"]}


def relative_change(ts: dict[str, float], reference: dict[str, float]) -> tuple[float, float]:
    """Median and largest |t / t_reference - 1| over the thresholds with t_reference > 0."""
    import numpy as np

    change = [abs(ts[k] / v - 1) for k, v in reference.items() if v > 0]
    return (float(np.median(change)), float(max(change))) if change else (0.0, 0.0)


if __name__ == "__main__":
    main()
