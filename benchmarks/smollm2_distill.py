"""SmolLM2-135M: recovery by distillation (the distill pass) against the training-free
thresholds it starts from, in domain and out of domain.

    python samples/smollm2/build.py                                   # once
    python benchmarks/smollm2_distill.py --targets 0.4 0.5 0.6 --device cuda --bf16

For each target: thresholds calibrated at one level (calibrate-thresholds, MAC-weighted body
sparsity, LM head dense) on `--calib-windows` 256-token windows of WikiText-2 valid; then the
same plus `distill` (all weights trained against the dense model on the whole of valid.txt
and `--samples` windows sampled from the dense model itself). Each model is evaluated in ONNX
Runtime (the compiled model.onnx itself) on `--eval-windows` windows of WikiText-2 test and of
an out-of-domain text (Debian's `fortunes`, benchmarks/ood_text.py, or `--ood`), against the
dense model on the same windows, with the MAC-weighted body sparsity measured on test; and the
distilled weights once more with every threshold open (has the dense model been harmed?).
Rows are printed as they finish and written to `--json`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from smollm2_setup import DATA, MODEL_DIR  # a sibling module: benchmarks run as scripts


def evaluate(path: Path, sources: dict) -> dict:
    import sparsecc

    out = {}
    for name, source in sources.items():
        r = sparsecc.evaluate(path, source)["result"]
        out[name] = {"ppl": r["perplexity"], "body_sparsity": r["macs"]["body"]["sparsity"]}
    return out


def opened(path: Path, out: Path) -> Path:
    """The model at `path` with every threshold at t = 0 (its weights as they are)."""
    from sparsecc import model_io, ops

    model = model_io.load_model(path)
    for node in model.graph:
        if ops.is_threshold(node):
            ops.set_threshold(node, 0.0)
    out.mkdir(parents=True, exist_ok=True)
    model_io.save_model(model, out / "model.onnx")
    return out / "model.onnx"


def main(argv=None) -> None:
    import sparsecc
    from sparsecc.passes import get

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--data", type=Path, default=DATA, help="folder of WikiText-2 valid.txt and test.txt")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5])
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--ood", type=Path, help="out-of-domain text (default: Debian's fortunes, fetched once)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="a distill recipe: options over the ones above (repeatable: one row each)")
    ap.add_argument("--no-uniform", action="store_true", help="skip the training-free rows")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, help="write the rows here as they finish")
    args = ap.parse_args(argv)
    if args.ood is None:
        from ood_text import fortunes_text
        args.ood = fortunes_text()
    model = args.model_dir / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"{model} not found: run python samples/smollm2/build.py first")
    calib = sparsecc.data_source(args.data / "valid.txt", args.model_dir, 256, args.calib_windows)
    sources = {"wikitext": sparsecc.data_source(args.data / "test.txt", args.model_dir, 256, args.eval_windows),
               "ood": sparsecc.data_source(args.ood, args.model_dir, 256, args.eval_windows)}
    base_options = dict(steps=args.steps, batch=args.batch, lr=args.lr, samples=args.samples, bf16=args.bf16,
                        sample_batch=args.sample_batch)
    variants = [dict(kv.split("=", 1) for kv in v.split(",")) for v in args.variant] or [{}]
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="sparsecc-bench-cache-"))
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    start = time.perf_counter()
    dense = evaluate(model, sources)
    record({"model": "dense", **dense, "seconds": round(time.perf_counter() - start, 1)})
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            base = [get("discover-sites")(), get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=target)]
            runs = [] if args.no_uniform else [("uniform", base, {})]
            runs += [("uniform+distill", base + [get("distill")(**(base_options | v))], v) for v in variants]
            for i, (label, passes, variant) in enumerate(runs):
                out = Path(tmp) / f"{label}-{target}-{i}"
                start = time.perf_counter()
                result = sparsecc.compile_model(model, passes, calib, out=out, cache_dir=cache, device=args.device)
                seconds = time.perf_counter() - start
                row = {"model": label, "target": target, "variant": variant, **evaluate(out / "model.onnx", sources),
                       "compile_seconds": round(seconds, 1)}
                if label.endswith("distill"):
                    d = result.report["passes"][-1]["details"]
                    row["training"] = d["training"]
                    row["held_out"] = d["held_out"]
                    row["calibrated_model_sparsity"] = d["calibrated_model_sparsity"]
                    row["open"] = evaluate(opened(out / "model.onnx", Path(tmp) / f"open-{target}-{i}"), sources)
                for name in sources:
                    row[name]["vs_dense"] = row[name]["ppl"] / dense[name]["ppl"] - 1
                record(row)
    print(f"\nSmolLM2-135M, {args.eval_windows} x 256 tokens each of WikiText-2 test and {args.ood.name} "
          f"(dense {dense['wikitext']['ppl']:.3f} / {dense['ood']['ppl']:.3f}); calibrated on "
          f"{args.calib_windows} windows of valid; MAC-weighted body sparsity measured on test")
    print(f"{'model':<16} {'target':>6} {'sparsity':>8} {'wikitext':>9} {'vs dense':>8} {'ood':>9} {'vs dense':>8} "
          f"{'tokens':>10} {'train s':>7} {'device':>6}  weights with thresholds open")
    for r in rows[1:]:
        t = r.get("training", {})
        if r["variant"]:
            print("  " + ",".join(f"{k}={v}" for k, v in r["variant"].items()))
        open_ = (f"{r['open']['wikitext']['ppl'] / dense['wikitext']['ppl'] - 1:+.1%} / "
                 f"{r['open']['ood']['ppl'] / dense['ood']['ppl'] - 1:+.1%}") if "open" in r else ""
        print(f"{r['model']:<16} {r['target']:>6.0%} {r['wikitext']['body_sparsity']:>8.2%} "
              f"{r['wikitext']['ppl']:>9.3f} {r['wikitext']['vs_dense']:>+8.1%} {r['ood']['ppl']:>9.3f} "
              f"{r['ood']['vs_dense']:>+8.1%} {t.get('tokens', 0):>10,} {t.get('training_seconds', 0):>7.0f} "
              f"{t.get('device', ''):>6}  {open_}")


if __name__ == "__main__":
    main()
