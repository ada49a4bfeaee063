"""SmolLM2-135M: sparsity allocated by measured loss (allocate-sparsity) against one level for
all thresholds (calibrate-thresholds, MAC-weighted), at the same model-wide targets.

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_allocation.py --targets 0.4 0.5 --eval-windows 64

Every run: 32 x 256-token calibration windows of valid.txt (statistics), the allocation's
loss on the first 4 of them, perplexity on evenly spread 256-token windows of test.txt
(ONNX Runtime), against the dense model on the same windows. Prints perplexity, its change
from dense, the measured body sparsity, and the search's forward passes and wall time.
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
    ap.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args(argv)
    model, calib, test, dense = load(args.model_dir, args.calib_windows, args.eval_windows)
    methods = {
        "one level (mac-weighted)": lambda s: get("calibrate-thresholds")(sparsity=s),
        "allocated by role": lambda s: get("allocate-sparsity")(sparsity=s, start=s - 0.2),
        "allocated by role x 3 bands": lambda s: get("allocate-sparsity")(sparsity=s, start=s - 0.2, bands=3),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            for label, make in methods.items():
                out = Path(tmp) / f"{target}-{len(rows)}"
                start = time.perf_counter()
                result = sparsecc.compile_model(model, [get("discover-sites")(), get("insert-thresholds")(), make(target)],
                                                calib, out=out, cache_dir=default_cache_dir())
                seconds = time.perf_counter() - start
                details = result.report["passes"][-1]["details"]
                passes = details.get("search", {}).get("forward_passes", 0)
                r = sparsecc.evaluate(out / "model.onnx", test)["result"]
                rows.append((target, label, r["perplexity"], r["macs"]["body"]["sparsity"], passes, seconds))
                print(f"{target:.0%} {label}: ppl {r['perplexity']:.3f}, {seconds:.0f} s", flush=True)
    print(f"\nSmolLM2-135M, perplexity on {len(test)} x 256 tokens of test.txt (dense {dense:.3f})")
    print(f"{'target':>6} {'method':<28} {'ppl':>8} {'vs dense':>8} {'body sparsity':>13} {'search passes':>13} {'compile s':>9}")
    for target, label, ppl, body, passes, seconds in rows:
        print(f"{target:>6.0%} {label:<28} {ppl:>8.3f} {ppl / dense - 1:>+8.1%} {body:>13.1%} {passes:>13} {seconds:>9.0f}")


if __name__ == "__main__":
    main()
