"""SmolLM2-135M sparse and quantized on the seneca target: perplexity (ort backend) and energy,
latency and cores (seneca simulator) for dense 16-bit, sparse 16-bit, sparse + int8 weights
and sparse + int8 weights and int8 events (mixed, and all), in one table.

    python samples/smollm2/build.py                                   # once
    python benchmarks/seneca_quantized.py --targets 0.5 0.6 --eval-windows 64 --tokens 256
    python benchmarks/seneca_quantized.py --targets 0.5 --smooth 0.5  # + rows smoothed first

For each sparsity target and each quantization (none, --quant w8, --quant w8a8 with its
default mixed precision, and w8a8 with every event int8; with --smooth, both w8a8 rows again
with smooth-activations first): `sparsecc compile --target seneca` (32 x 256-token
calibration windows of valid.txt), then perplexity on evenly spread 256-token windows of
test.txt and of an out-of-domain text (Debian's fortunes, or --ood) with ONNX Runtime, then
the simulator on one window of test.txt (sparse, and the dense baseline of the same compile).
The peer of every row is the float model: its perplexity without thresholds, and its dense
16-bit energy on the same chip.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from smollm2_setup import DATA, MODEL_DIR, load  # a sibling module: benchmarks run as scripts
# (label, --quant, quantize-activations max_error): w8a8 keeps 16-bit events where int8 would
# lose more than 0.1% of a tensor's power (the default); "all int8" quantizes every one
QUANTS = (("16-bit", None, None), ("w8", "w8", None), ("w8a8", "w8a8", None), ("w8a8 all int8", "w8a8", 1.0))
SMOOTHED = (("w8a8 smoothed", "w8a8", None), ("all int8 smoothed", "w8a8", 1.0))


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.backends.seneca.simulation import simulate
    from sparsecc.calibration import default_cache_dir
    from sparsecc.passes import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6])
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256, help="tokens simulated (one window of test.txt)")
    ap.add_argument("--smooth", type=float, metavar="ALPHA", help="add the w8a8 rows with smooth-activations "
                    "(SmoothQuant) at this alpha first")
    ap.add_argument("--ood", type=Path, help="out-of-domain text (default: Debian's fortunes, fetched once)")
    ap.add_argument("--skip", nargs="*", default=[], metavar="LABEL", help="rows to leave out, e.g. w8 "
                    "(16-bit is the energy baseline: always run)")
    args = ap.parse_args(argv)
    if args.ood is None:
        from ood_text import fortunes_text
        args.ood = fortunes_text()
    model, calib, test, float_ppl = load(args.model_dir, args.calib_windows, args.eval_windows)
    ood = sparsecc.data_source(args.ood, args.model_dir, 256, args.eval_windows)
    float_ood = sparsecc.evaluate(model, ood)["result"]["perplexity"]
    window = sparsecc.data_source(DATA / "test.txt", args.model_dir, args.tokens, 1)
    quants = [(*q, None) for q in QUANTS] + ([(*q, args.smooth) for q in SMOOTHED] if args.smooth is not None else [])
    quants = [q for q in quants if q[0] == "16-bit" or q[0] not in args.skip]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            for label, quant, max_error, smooth in quants:
                start = time.perf_counter()
                out = Path(tmp) / f"s{target}-{label.replace(' ', '-')}"
                passes = sparsecc.default_pipeline(sparsity=target, quant=quant, smooth=smooth)
                if max_error is not None:
                    passes[-1] = get("quantize-activations")(max_error=max_error)
                result = sparsecc.compile_model(model, passes, calib, out=out, target="seneca", cache_dir=default_cache_dir())
                details = {p["pass"]: p["details"] for p in result.report["passes"]}
                cores = details["partition"]["cores_used"]
                kept = details["quantize-activations"]["kept_16_bit"] if "quantize-activations" in details else None
                ppl = sparsecc.evaluate(out / "model.onnx", test)["result"]["perplexity"]
                ppl_ood = sparsecc.evaluate(out / "model.onnx", ood)["result"]["perplexity"]
                report = simulate(out, window, compare=False)
                rows.append((target, label, cores, ppl, report, ppl_ood, kept))
                print(f"{target:.0%} {label}: {time.perf_counter() - start:.0f} s", flush=True)
    dense16 = next(r for r in rows if r[1] == "16-bit")[4]["dense"]
    e0, l0 = dense16["energy_pj_per_token"]["total"], dense16["latency_cycles_per_token"]
    print(f"\nSmolLM2-135M; perplexity on {len(test)} x 256 tokens of test.txt and of {args.ood.name} (float, no "
          f"thresholds: {float_ppl:.3f} / {float_ood:.3f}); energy and latency per token on {args.tokens} simulated tokens")
    print(f"{'model':<34} {'cores':>5} {'16-bit':>6} {'ppl':>8} {'vs float':>8} {'ood ppl':>8} {'vs float':>8} "
          f"{'uJ/token':>9} {'vs dense 16-bit':>15} {'latency ms':>10} {'vs dense 16-bit':>15}")
    print(f"{'dense 16-bit':<34} {next(r[2] for r in rows if r[1] == '16-bit'):>5} {'':>6} {float_ppl:>8.3f} {'':>8} "
          f"{float_ood:>8.3f} {'':>8} {e0 / 1e6:>9.1f} {'1.00x':>15} {dense16['latency_s_per_token'] * 1e3:>10.2f} "
          f"{'1.00x':>15}")
    for target, quant, cores, ppl, r, ppl_ood, kept in rows:
        s = r["sparse"]
        e, lat = s["energy_pj_per_token"]["total"], s["latency_cycles_per_token"]
        print(f"{f'{target:.0%} sparse, {quant}':<34} {cores:>5} {'' if kept is None else kept:>6} {ppl:>8.3f} "
              f"{ppl / float_ppl - 1:>+8.1%} {ppl_ood:>8.3f} {ppl_ood / float_ood - 1:>+8.1%} {e / 1e6:>9.1f} "
              f"{e0 / e:>14.2f}x {s['latency_s_per_token'] * 1e3:>10.2f} {l0 / lat:>14.2f}x")
    print("(16-bit: event tensors kept 16-bit by w8a8's mixed precision)")
    print("(same-sparsity perplexity deltas, int8 vs 16-bit: "
          + ", ".join(f"{t:.0%} {q} {p / next(x[3] for x in rows if x[0] == t and x[1] == '16-bit') - 1:+.2%}"
                      for t, q, _, p, *_ in rows if q != "16-bit") + ")")


if __name__ == "__main__":
    main()
