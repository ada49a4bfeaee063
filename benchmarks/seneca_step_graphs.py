"""Step graphs on the seneca simulator: per-token energy and latency, sparse vs dense, state
memory, and the per-token cost at context positions (RWKV, Mamba, xLSTM vs SmolLM2 decode).

    python samples/recurrent/train.py ...          # build/recurrent/{rwkv,mamba,xlstm}/step
    python samples/smollm2/decode.py ...           # build/smollm2-135m-decode
    python benchmarks/seneca_step_graphs.py --sparsity 0.5 --tokens 16 --positions 64 512

For each step graph that is built (the others are skipped with a note): `sparsecc compile
--target seneca` at --sparsity (calibrate-thresholds on --calib-windows windows of
--calib-tokens tokens of WikiText-2 valid), then `sparsecc simulate` on --tokens tokens of
test, token by token with the state resident in core data memory: sparse vs the dense
baseline (the peer), argmax checked against ONNX Runtime on the same compiled graph. At each
of --positions the state is brought there with ONNX Runtime (the data's first P tokens) and
--position-tokens tokens are simulated from there. State bytes are resident 16-bit words
(the exported graph keeps float32: twice that); `fits` is whether every state's core still
holds it at that context (a KV cache has room reserved for the partition's max_context,
256 by default).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
MODELS = {"rwkv": REPO / "build" / "recurrent" / "rwkv" / "step",
          "mamba": REPO / "build" / "recurrent" / "mamba" / "step",
          "xlstm": REPO / "build" / "recurrent" / "xlstm" / "step",
          "smollm2-decode": REPO / "build" / "smollm2-135m-decode"}


def run_model(name: str, folder: Path, args, tmp: Path) -> dict:
    out = tmp / name
    cli = [sys.executable, "-m", "sparsecc.cli", "-q"]
    start = time.perf_counter()
    subprocess.run(cli + ["compile", str(folder / "model.onnx"), "--target", "seneca", "--sparsity", str(args.sparsity),
                          "--calib", str(DATA / "valid.txt"), "--tokenizer", str(folder), "--seq-len", str(args.calib_tokens),
                          "--windows", str(args.calib_windows), "--no-cache", "-o", str(out)], check=True)
    compiled = time.perf_counter()
    subprocess.run(cli + ["simulate", str(out), "--text", str(DATA / "test.txt"), "--tokens", str(args.tokens),
                          "--windows", "1", "--positions", *map(str, args.positions),
                          "--position-tokens", str(args.position_tokens)], check=True)
    report = json.loads((out / "simulation" / "report.json").read_text())
    report["wall_s"] = {"compile": compiled - start, "simulate": time.perf_counter() - compiled}
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16, help="tokens of test simulated from the initial state")
    ap.add_argument("--positions", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--position-tokens", type=int, default=2)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = MODELS[name]
            if not (folder / "model.onnx").is_file():
                print(f"skipping {name}: {folder}/model.onnx is not built")
                continue
            rows.append((name, run_model(name, folder, args, Path(tmp))))
    positions = args.positions
    print(f"\nStep graphs on seneca at {args.sparsity:.0%} sparsity (calibrate-thresholds), {args.tokens} tokens of "
          f"WikiText-2 test from the initial state; at positions {', '.join(map(str, positions))}: state warmed with "
          f"ONNX Runtime, {args.position_tokens} tokens simulated. Energy in uJ/token, latency in cycles/token, "
          f"state in resident 16-bit bytes.")
    head = (f"{'model':>15} {'E sparse':>9} {'E dense':>8} {'lat sparse':>10} {'lat dense':>9} {'argmax=ort':>10} "
            + " ".join(f"{'state@' + str(p):>11} {'fits':>4}" for p in (64, 512))
            + " " + " ".join(f"{'E@' + str(p) + ' sp/de':>15} {'lat@' + str(p) + ' sp':>10}" for p in positions)
            + f" {'wall s':>7}")
    print(head)
    for name, r in rows:
        s, d, st = r["sparse"], r["dense"], r["state"]
        at = {row["position"]: row for row in r["positions"]}
        line = (f"{name:>15} {s['energy_pj_per_token']['total'] / 1e6:>9.2f} {d['energy_pj_per_token']['total'] / 1e6:>8.2f} "
                f"{s['latency_cycles_per_token']:>10,.0f} {d['latency_cycles_per_token']:>9,.0f} "
                f"{r['vs_ort']['argmax_agreement']:>10.1%} ")
        line += " ".join(f"{st['by_context'][str(p)]['resident_bytes']:>11,} {'yes' if st['by_context'][str(p)]['fits'] else 'no':>4}"
                         for p in (64, 512))
        for p in positions:
            row = at[p]
            energy = f"{row['sparse']['energy_pj_per_token']['total'] / 1e6:.2f}/{row['dense']['energy_pj_per_token']['total'] / 1e6:.2f}"
            line += f" {energy:>15} {row['sparse']['latency_cycles_per_token']:>10,.0f}"
        line += f" {r['wall_s']['compile'] + r['wall_s']['simulate']:>7.0f}"
        print(line)
    print("\nState per role (bytes at the start / end of the run, per core: see each report.json 'state'):")
    for name, r in rows:
        roles = ", ".join(f"{role} {row['end_bytes']:,}" for role, row in r["state"]["per_role"].items())
        grows = (f"+{r['state']['bytes_per_position']:,} B/position, fits up to context {r['state']['fits_up_to_context']}"
                 if r["state"]["grows"] else "constant")
        print(f"  {name}: {len(r['state']['per_core'])} cores, {grows}; {roles}")


if __name__ == "__main__":
    main()
