"""SmolLM2-135M at several sparsity targets: calibrated on WikiText-2 valid, measured on test.

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_sparsity.py --targets 0.4 0.5 --eval-windows 128

For each target: `sparsecc compile` (default pipeline, 64 x 256-token calibration windows of
valid.txt), then `sparsecc eval` on evenly spread 256-token windows of test.txt against the
dense model on the same windows. Prints target vs measured effective-MAC sparsity (body =
every linear site but the LM head, which stays dense), perplexity, and output error.
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
    args = ap.parse_args(argv)

    model = args.model_dir / "model.onnx"
    calib = sparsecc.data_source(DATA / "valid.txt", args.model_dir, 256, args.calib_windows)
    test = sparsecc.data_source(DATA / "test.txt", args.model_dir, 256, args.eval_windows or None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            start = time.perf_counter()
            out = Path(tmp) / f"s{target}"
            sparsecc.compile_model(model, sparsecc.default_pipeline(sparsity=target, mode=args.mode), calib,
                                   out=out, cache_dir=default_cache_dir())
            compiled = time.perf_counter() - start
            r = sparsecc.evaluate(out / "model.onnx", test, reference=model)["result"]
            rows.append((target, r, compiled))
            print(f"target {target:.2f} done: compile {compiled:.0f} s", flush=True)
    print(f"\nSmolLM2-135M, {args.mode} thresholds; eval: {len(test)} x 256 tokens of test.txt "
          f"({rows[0][1]['tokens']} predicted tokens)")
    print(f"{'target':>7} {'measured body':>14} {'with head':>10} {'ppl':>9} {'dense ppl':>10} {'delta':>8} "
          f"{'top-1':>7} {'cosine':>8} {'compile s':>10}")
    for target, r, secs in rows:
        body, every, err = r["macs"]["body"]["sparsity"], r["macs"]["all"]["sparsity"], r["output_error"]
        print(f"{target:7.2f} {100 * body:13.2f}% {100 * every:9.2f}% {r['perplexity']:9.3f} "
              f"{r['reference_perplexity']:10.3f} {100 * (r['perplexity'] / r['reference_perplexity'] - 1):+7.1f}% "
              f"{100 * err['top1_agreement']:6.1f}% {err['mean_cosine']:8.4f} {secs:10.0f}")


if __name__ == "__main__":
    main()
