"""How many calibration windows give the thresholds of many: SmolLM2-135M, WikiText-2 valid.

    python samples/smollm2/build.py                                  # once
    python benchmarks/calibration_windows.py                         # ~30 min on 2 busy cores: one pass over 384 windows

One dense pass (refine=0) of ONNX Runtime over a reference of --reference windows of
--seq-len tokens spread evenly over valid.txt (as `--windows 384` keeps them; every window of
the text is 1,069 at 256 tokens, more than a shared 2-core machine measures in the time), with
one |x| histogram (sparsecc.calibration.AbsHistogram) per threshold input accumulated for
several window subsets at once: for each N of --counts, N of the reference's windows spread
evenly over it ("A", as `--windows N` spreads them over a text) and N others interleaved with
them ("B", shifted by half a stride); plus the reference itself and its two halves (even and
odd windows: the noise floor of the largest disjoint samples). For each subset the
thresholds are set as calibrate-thresholds sets them (its level for --sparsity, mac-weighted,
then each threshold's t = threshold_for(level)) and compared with the reference's:

- |dt|/t: relative deviation of each threshold's t (max and mean over the thresholds);
- d sparsity: the sparsity each threshold would have *on the reference windows* (their
  histogram at the subset's t) minus the target, in percentage points (max |.| over the
  thresholds), and the model-wide MAC-weighted figure likewise;
- A vs B: the same max |dt|/t between the two disjoint N-window subsets, i.e. what N windows
  vary by anyway.

The default window count of `sparsecc compile` (sparsecc.compiler.CALIB_WINDOWS) is chosen
from this table; refine=1's second pass re-measures behind the thresholds on the same windows
and is not measured here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
MODEL_DIR = next((p for p in (REPO / "build" / "smollm2-135m", REPO.parent / "build" / "smollm2-135m")
                  if (p / "model.onnx").is_file()), REPO / "build" / "smollm2-135m")


def subsets(count: int, sizes: list[int]) -> dict[str, np.ndarray]:
    """Window indices of each subset: A = what `--windows N` keeps, B = N interleaved others."""
    out = {"all": np.arange(count), "even": np.arange(0, count, 2), "odd": np.arange(1, count, 2)}
    for n in sizes:
        if n * 2 > count:
            continue
        a = np.linspace(0, count - 1, n).round().astype(np.int64)
        stride = (count - 1) / max(n - 1, 1)
        b = np.minimum((a + stride / 2).round().astype(np.int64), count - 1)
        b = np.where(np.isin(b, a), np.minimum(b + 1, count - 1), b)
        out[f"A{n}"], out[f"B{n}"] = a, b
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--data", type=Path, default=DATA / "valid.txt")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--counts", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--reference", type=int, default=384, help="windows of the reference (0: every window)")
    args = ap.parse_args(argv)

    from sparsecc import model_io, ops
    from sparsecc import passes as registry
    from sparsecc.calibration import AbsHistogram
    from sparsecc.data import TextWindows, feeds_for_ids
    from sparsecc.pass_manager import Context, PassManager
    from sparsecc.progress import bar
    from sparsecc.runtime import load_session, saved_copy
    from sparsecc.sites import analyze

    model = model_io.load_model(args.model_dir / "model.onnx")
    PassManager([registry.get("discover-sites")(), registry.get("insert-thresholds")()]).run(model, Context())
    calibrate = registry.get("calibrate-thresholds")(sparsity=args.sparsity)
    from sparsecc.passes.calibrate_thresholds import _Threshold   # how the pass groups sites by threshold

    sites = analyze(model.graph).sites
    thresholds = [_Threshold(n, [s for s in sites if s.threshold == n.name]) for n in model.graph if ops.is_threshold(n)]
    natural = [s for s in sites if s.natural and not s.head]
    tensors = sorted({th.source for th in thresholds} | {s.consumes for s in natural})
    text = TextWindows(args.data, args.model_dir, seq_len=args.seq_len, limit=args.reference or None)
    groups = subsets(len(text), args.counts)
    member = {name: np.isin(np.arange(len(text)), idx) for name, idx in groups.items()}
    hists = {name: {t: AbsHistogram() for t in tensors} for name in groups}
    start = time.perf_counter()
    with saved_copy(model, tensors) as files:
        session = load_session(files[0])
        inputs = [i.name for i in session.get_inputs()]
        for i, row in enumerate(bar(text.rows, total=len(text), desc="dense pass over every window")):
            if i % 50 == 0:
                print(f"window {i}/{len(text)}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            arrays = dict(zip(tensors, session.run(tensors, feeds_for_ids(row, inputs))))
            window = {t: AbsHistogram() for t in tensors}
            for t in tensors:
                window[t].add(arrays[t])
            for name in groups:
                if member[name][i]:
                    for t in tensors:
                        hists[name][t].merge(window[t])
    seconds = time.perf_counter() - start

    def levels(h):
        level = calibrate._level(thresholds, natural, h)
        return {th.source: h[th.source].threshold_for(level) for th in thresholds}

    macs = {th.source: th.macs for th in thresholds}
    ref_hist, ref_t = hists["all"], levels(hists["all"])

    def compare(t: dict, against: dict) -> tuple[float, float]:
        rel = [abs(t[k] - against[k]) / against[k] for k in t if against[k] > 0]
        return max(rel), float(np.mean(rel))

    def on_all(t: dict) -> tuple[float, float]:
        """Max |per-threshold sparsity - target| (on every window) and the model-wide MAC-weighted figure."""
        per = {k: ref_hist[k].sparsity_at(v) for k, v in t.items()}
        wide = sum(macs[k] * per[k] for k in per) / sum(macs.values())
        return max(abs(v - args.sparsity) for v in per.values()), wide

    print(f"\nSmolLM2-135M ({args.model_dir}), {args.data.name}: {len(text)} windows x {args.seq_len} tokens, "
          f"{len(thresholds)} thresholds, target {args.sparsity:.0%} mac-weighted, refine=0; "
          f"one dense pass {seconds:.0f} s")
    wide_ref = on_all(ref_t)[1]
    print(f"reference ({len(text)} windows): model-wide sparsity {wide_ref:.4%}")
    print(f"{'windows':>9} {'max |dt|/t':>11} {'mean |dt|/t':>12} {'max |d sparsity|':>17} {'model-wide':>11} "
          f"{'A vs B max |dt|/t':>18}")
    rows = [(name[1:], name) for name in groups if name.startswith("A")] + [("half", "even")]
    for label, name in rows:
        t = levels(hists[name])
        other = levels(hists["B" + name[1:] if name.startswith("A") else "odd"])
        worst, mean = compare(t, ref_t)
        dev, wide = on_all(t)
        print(f"{label:>9} {worst:11.2%} {mean:12.2%} {100 * dev:15.2f}pp {wide:11.4%} {compare(t, other)[0]:18.2%}")


if __name__ == "__main__":
    main()
