"""SmolLM2-135M on the seneca simulator: energy and latency ratios, accuracy vs ort, and speed
against ONNX Runtime (the peer) on the same model and tokens, in one run.

    python samples/smollm2/build.py                                   # once
    python benchmarks/seneca_simulator.py --targets 0.4 0.5 0.6 --tokens 256

For each target: `sparsecc compile --target seneca` (32 x 256-token calibration windows of
valid.txt), then `sparsecc simulate` on a window of test.txt: sparse and dense baseline,
logits and effective MACs checked against the ort backend (the simulator's own threshold
decisions, and ORT's), simulated tokens/s vs ONNX Runtime tokens/s on the same window (wall
clock, this machine; ORT with its graph optimizations).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "build" / "smollm2-135m")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)
    if not (args.model_dir / "model.onnx").is_file():
        sys.exit(f"{args.model_dir}/model.onnx not found: run python samples/smollm2/build.py first")
    sparsecc = [sys.executable, "-m", "sparsecc.cli", "-q"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            out = Path(tmp) / f"s{target}"
            subprocess.run(sparsecc + ["compile", str(args.model_dir / "model.onnx"), "--sparsity", str(target),
                                       "--calib", str(DATA / "valid.txt"), "--tokenizer", str(args.model_dir),
                                       "--windows", str(args.calib_windows), "--target", "seneca", "-o", str(out)], check=True)
            subprocess.run(sparsecc + ["simulate", str(out), "--text", str(DATA / "test.txt"),
                                       "--tokens", str(args.tokens)], check=True)
            report = json.loads((out / "simulation" / "report.json").read_text())
            speed = json.loads((out / "simulation" / "timings.json").read_text())
            rows.append((target, report, speed))
    print(f"\nSmolLM2-135M, {args.tokens} tokens of WikiText-2 test, seneca target (16-bit values)")
    print(f"{'target':>6} {'E sparse uJ/tok':>15} {'E dense':>8} {'E ratio':>7} {'lat ratio':>9} {'MAC ratio':>9} "
          f"{'argmax=ort':>10} {'same, ORT decisions':>19} {'MACs vs ort':>11} {'sim tok/s':>9} {'ORT tok/s':>9} {'slowdown':>8}")
    for target, r, sp in rows:
        s, d, v = r["sparse"], r["dense"], r["vs_ort"]
        print(f"{target:>6.0%} {s['energy_pj_per_token']['total'] / 1e6:>15.1f} {d['energy_pj_per_token']['total'] / 1e6:>8.1f} "
              f"{r['ratio']['energy']:>7.2f} {r['ratio']['latency']:>9.2f} {r['ratio']['effective_macs']:>9.2f} "
              f"{v['argmax_agreement']:>10.1%} {v['with_ort_decisions']['argmax_agreement']:>19.1%} {v['mac_difference']:>+11.3%} {sp['simulated_tokens_per_s']:>9.1f} "
              f"{sp['ort_tokens_per_s']:>9.1f} {sp['slowdown_vs_ort']:>7.1f}x")
        print(f"{'':>6} energy shares (sparse): " + ", ".join(f"{k} {x:.1%}" for k, x in s["energy_share"].items()) +
              f"; embedding/head/final norm ('other') {s['per_layer']['other']['total'] / s['energy_pj_per_token']['total']:.1%}")


if __name__ == "__main__":
    main()
