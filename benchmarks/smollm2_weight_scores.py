"""SmolLM2-135M: weight-aware thresholds (weight-scores, WINA) against magnitude thresholds,
both set by calibrate-thresholds (MAC-weighted) at the same targets.

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_weight_scores.py --targets 0.5 --calib-windows 16 --eval-windows 16

Every run: 256-token calibration windows of valid.txt, perplexity on evenly spread 256-token
windows of test.txt (ONNX Runtime), against the dense model on the same windows. Prints
perplexity, its change from dense and the measured body sparsity.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from smollm2_setup import MODEL_DIR, load  # a sibling module: benchmarks run as scripts


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.calibration import default_cache_dir
    from sparsecc.passes import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--exponent", type=float, default=1.0, help="weight-scores exponent (1: WINA)")
    args = ap.parse_args(argv)
    model, calib, test, dense = load(args.model_dir, args.calib_windows, args.eval_windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            for label, scores in (("magnitude |x|", []), (f"weight-aware |x| c^{args.exponent:g}",
                                                          [get("weight-scores")(exponent=args.exponent)])):
                out = Path(tmp) / f"{target}-{len(rows)}"
                passes = [get("discover-sites")(), get("insert-thresholds")(), *scores,
                          get("calibrate-thresholds")(sparsity=target)]
                sparsecc.compile_model(model, passes, calib, out=out, cache_dir=default_cache_dir())
                r = sparsecc.evaluate(out / "model.onnx", test)["result"]
                rows.append((target, label, r["perplexity"], r["macs"]["body"]["sparsity"]))
                print(f"{target:.0%} {label}: ppl {r['perplexity']:.3f}", flush=True)
    print(f"\nSmolLM2-135M, calibrate-thresholds on {len(calib)} x 256 tokens of valid.txt, perplexity on "
          f"{len(test)} x 256 tokens of test.txt (dense {dense:.3f})")
    print(f"{'target':>6} {'thresholds on':<26} {'ppl':>8} {'vs dense':>8} {'body sparsity':>13}")
    for target, label, ppl, body in rows:
        print(f"{target:>6.0%} {label:<26} {ppl:>8.3f} {ppl / dense - 1:>+8.1%} {body:>13.1%}")


if __name__ == "__main__":
    main()
