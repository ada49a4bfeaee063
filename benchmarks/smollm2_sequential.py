"""SmolLM2-135M: the sequential loss-monitored search (sequential-search) at several loss_inc
values, against one level for all thresholds at the sparsity the search reached.

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_sequential.py --loss-inc 1.0002 1.0005 --eval-windows 64

Every run: statistics from 32 x 256-token windows of valid.txt, the search's loss
(next-token cross-entropy) on the first 4 of them, perplexity on evenly spread 256-token
windows of test.txt (ONNX Runtime). The peer row calibrates one MAC-weighted level for all
thresholds to the model-wide sparsity the search reached.
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
    ap.add_argument("--loss-inc", type=float, nargs="+", default=[1.0002, 1.0005])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args(argv)
    model, calib, test, dense = load(args.model_dir, args.calib_windows, args.eval_windows)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for loss_inc in args.loss_inc:
            out = Path(tmp) / f"seq-{loss_inc}"
            start = time.perf_counter()
            result = sparsecc.compile_model(model, [get("discover-sites")(), get("insert-thresholds")(),
                                                    get("sequential-search")(loss_inc=loss_inc)],
                                            calib, out=out, cache_dir=default_cache_dir())
            seconds = time.perf_counter() - start
            details = result.report["passes"][-1]["details"]
            r = sparsecc.evaluate(out / "model.onnx", test)["result"]
            reached = r["macs"]["body"]["sparsity"]
            rows.append((f"sequential, loss_inc {loss_inc}", r["perplexity"], reached, details["search"]["forward_passes"],
                         seconds, details["mean_sparsity_by_role"]))
            peer = Path(tmp) / f"level-{loss_inc}"
            sparsecc.compile_model(model, sparsecc.default_pipeline(sparsity=round(reached, 4)), calib, out=peer,
                                   cache_dir=default_cache_dir())
            p = sparsecc.evaluate(peer / "model.onnx", test)["result"]
            rows.append((f"one level at {reached:.1%}", p["perplexity"], p["macs"]["body"]["sparsity"], 0, 0.0, None))
            print(f"loss_inc {loss_inc}: {seconds:.0f} s", flush=True)
    print(f"\nSmolLM2-135M, perplexity on {len(test)} x 256 tokens of test.txt (dense {dense:.3f})")
    print(f"{'method':<32} {'ppl':>8} {'vs dense':>8} {'body sparsity':>13} {'search passes':>13} {'search s':>8}")
    for label, ppl, body, passes, seconds, roles in rows:
        print(f"{label:<32} {ppl:>8.3f} {ppl / dense - 1:>+8.1%} {body:>13.1%} {passes:>13} {seconds:>8.0f}")
        if roles:
            print(f"{'':<32} mean sparsity by role: " + ", ".join(f"{k} {v:.0%}" for k, v in roles.items()))


if __name__ == "__main__":
    main()
