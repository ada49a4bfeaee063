"""SmolLM2-135M: low-rank compensation (compensate-lowrank, R-Sparse) against none, at the same
model-wide MAC-weighted target (the compensation's MACs paid for out of it).

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_compensation.py --targets 0.5 --ranks 8 32 --eval-windows 64

Every run: calibrate-thresholds on 256-token windows of valid.txt (--calib-windows), perplexity
on evenly spread 256-token windows of test.txt (ONNX Runtime), against the dense model on the
same windows. Prints perplexity, its change from dense, the level every threshold is at (higher
with compensation: it pays for the factors), the measured body sparsity (factors counted), and
the compensation's extra MACs per token. With --same-thresholds, also each rank on the
thresholds calibrated without compensation (compensate-lowrank after calibrate-thresholds):
what the factors recover, at a body sparsity below the target.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from smollm2_setup import MODEL_DIR, load  # a sibling module: benchmarks run as scripts


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.calibration import default_cache_dir
    from sparsecc.passes import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="compensation ranks (0: none, always run)")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--same-thresholds", action="store_true",
                    help="also compensate on top of the thresholds calibrated without compensation")
    args = ap.parse_args(argv)
    model, calib, test, dense = load(args.model_dir, args.calib_windows, args.eval_windows)
    print(f"dense: ppl {dense:.3f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            runs = [(r, False) for r in [0] + [r for r in args.ranks if r > 0]]
            runs += [(r, True) for r in args.ranks if r > 0 and args.same_thresholds]
            for rank, same in runs:
                out = Path(tmp) / f"{target}-{rank}-{same}"
                compensate = [get("compensate-lowrank")(rank=rank)] if rank else []
                calibrate = [get("calibrate-thresholds")(sparsity=target)]
                passes = [get("discover-sites")(), get("insert-thresholds")(),
                          *(calibrate + compensate if same else compensate + calibrate)]
                start = time.perf_counter()
                result = sparsecc.compile_model(model, passes, calib, out=out, cache_dir=default_cache_dir())
                seconds = time.perf_counter() - start
                reports = {p["pass"]: p["details"] for p in result.report["passes"]}
                extra = reports.get("compensate-lowrank", {}).get("extra_macs_per_token", {})
                r = sparsecc.evaluate(out / "model.onnx", test)["result"]
                rows.append((target, f"{rank}{' *' if same else ''}", r["perplexity"], reports["calibrate-thresholds"]["level"],
                             r["macs"]["body"]["sparsity"], r["macs"]["body"]["dense_per_token"], extra, seconds))
                print(f"{target:.0%} rank {rows[-1][1]}: ppl {r['perplexity']:.3f}, {seconds:.0f} s", flush=True)
    print(f"\nSmolLM2-135M, perplexity on {len(test)} x 256 tokens of test.txt (dense {dense:.3f}), "
          f"thresholds calibrated on {len(calib)} x 256 tokens of valid.txt")
    print(f"{'target':>6} {'rank':>6} {'ppl':>8} {'vs dense':>8} {'level':>6} {'body sparsity':>13} "
          f"{'factor MACs/token (dense + per dropped)':>40} {'compile s':>9}")
    for target, rank, ppl, level, body, dense_macs, extra, seconds in rows:
        share = (f"{extra['dense'] / dense_macs:.1%} + {extra['per_dropped_value'] / dense_macs:.1%} x dropped"
                 if extra else "-")
        print(f"{target:>6.0%} {rank:>6} {ppl:>8.3f} {ppl / dense - 1:>+8.1%} {level:>6.3f} {body:>13.1%} "
              f"{share:>40} {seconds:>9.0f}")


    if args.same_thresholds:
        print("* on the thresholds calibrated without compensation (the factors' MACs not paid for)")


if __name__ == "__main__":
    main()
