"""SmolLM2-135M: thresholds calibrated at one level (calibrate-thresholds, MAC-weighted) and
then fine-tuned (finetune-bands) at the same model-wide sparsity.

    python samples/smollm2/build.py                                   # once
    nice -n 10 python benchmarks/smollm2_finetune.py --sparsity 0.5 --steps 40

Calibration: `--calib-windows` x 256-token windows of valid.txt (statistics; the first
`--windows` of them are trained on). Perplexity on `--eval-windows` evenly spread
256-token windows of test.txt (ONNX Runtime), dense model on the same windows. Prints the
perplexity and measured body sparsity of both models, the fine-tuning's calibration loss
before/after, and its steps, tokens and time per step.
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
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.02)
    args = ap.parse_args(argv)
    model, calib, test, dense = load(args.model_dir, args.calib_windows, args.eval_windows)
    base = [get("discover-sites")(), get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=args.sparsity)]
    tuned = get("finetune-bands")(steps=args.steps, windows=args.windows, batch=args.batch, lr=args.lr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, passes in (("calibrated", base), ("fine-tuned", base + [tuned])):
            out = Path(tmp) / label
            start = time.perf_counter()
            result = sparsecc.compile_model(model, passes, calib, out=out, cache_dir=default_cache_dir())
            seconds = time.perf_counter() - start
            r = sparsecc.evaluate(out / "model.onnx", test)["result"]
            rows.append((label, r["perplexity"], r["macs"]["body"]["sparsity"], seconds))
            details = result.report["passes"][-1]["details"]
            print(f"{label}: ppl {r['perplexity']:.3f}, body sparsity {r['macs']['body']['sparsity']:.2%}, "
                  f"compile {seconds:.0f} s", flush=True)
    t = details["training"]
    print(f"\nSmolLM2-135M, perplexity on {len(test)} x 256 tokens of test.txt (dense {dense:.3f}), "
          f"target {args.sparsity:.0%} MAC-weighted")
    print(f"{'model':<11} {'ppl':>8} {'vs dense':>8} {'body sparsity':>13} {'compile s':>9}")
    for label, ppl, body, seconds in rows:
        print(f"{label:<11} {ppl:>8.3f} {ppl / dense - 1:>+8.1%} {body:>13.2%} {seconds:>9.0f}")
    print(f"finetune-bands: calibration loss {details['loss']['before']:.4f} -> {details['loss']['after']:.4f} "
          f"on {details['loss']['windows']} windows; calibrated model-wide sparsity {details['target']:.4f} -> "
          f"{details['calibrated_model_sparsity']:.4f}; {t['steps']} steps x {args.batch} windows, {t['tokens']} tokens, "
          f"training {t['training_seconds']:.0f} s ({t['seconds_per_step']} s a step), {t['seconds']:.0f} s in all")
    for role, s in details["sparsity_by_role"].items():
        print(f"  {role:<24} mean sparsity {s['before']:.3f} -> {s['after']:.3f}")


if __name__ == "__main__":
    main()
