"""Where calibration's time goes: a profile of calibrate-thresholds on a few windows of SmolLM2-135M.

    python benchmarks/calibration_profile.py                 # 4 windows x 256 tokens, refine 0 and 1

It runs the default pipeline's calibration (discover-sites, insert-thresholds,
calibrate-thresholds, cache off) under cProfile and splits its wall time into: saving the
model copy ONNX Runtime loads, creating the session, ORT's runs (fetching the extra
outputs included), binning |x| into histograms, and the rest. For scale it first times the
plain forward pass the calibration rides on: the model as given (logits only), same
windows, same session options. Figures are wall seconds in this process; on a shared
machine compare the rows of one run only.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "build" / "smollm2-135m" / "model.onnx"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

# stage -> (file suffix, function name) whose cumulative time it is (first match wins)
STAGES = {
    "save model copy": [("model_io.py", "save_model")],
    "create session": [("onnxruntime_inference_collection.py", "_create_inference_session")],
    "ORT run (+ fetch)": [("runtime.py", "run")],
    "binning |x|": [("calibration.py", "bin_counts")],
}


def forward_seconds(model_path: Path, source) -> tuple[float, float]:
    """(session creation, runs) of the model as given, its own outputs only."""
    from sparsecc.runtime import load_session

    start = time.perf_counter()
    session = load_session(model_path)
    made = time.perf_counter()
    outputs = [o.name for o in session.get_outputs()]
    for feed in source.feeds([i.name for i in session.get_inputs()]):
        session.run(outputs, feed)
    return made - start, time.perf_counter() - made


def profile_calibration(model_path: Path, source, refine: int) -> dict:
    import sparsecc

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    result = sparsecc.compile_model(model_path, sparsecc.default_pipeline(refine=refine), source, out=None, cache_dir=None)
    profiler.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profiler).stats
    row = {"total": total, "calibrate-thresholds": result.timings["calibrate-thresholds"]}
    for stage, keys in STAGES.items():
        row[stage] = 0.0
        for (file, line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
            if any(file.endswith(suffix) and func == name for suffix, name in keys):
                row[stage] += ct
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the model's folder")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--refine", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    from sparsecc import progress
    from sparsecc.data import TextWindows

    progress.set_verbosity(0)
    source = TextWindows(args.data, args.tokenizer or args.model.parent, seq_len=args.seq_len, limit=args.windows)
    made, runs = forward_seconds(args.model, source)
    print(f"SmolLM2 calibration profile: {len(source)} windows x {args.seq_len} tokens, wall seconds")
    print(f"plain forward (model as given, its outputs only): session {made:.2f} s, runs {runs:.2f} s "
          f"({runs / len(source):.3f} s/window)")
    for refine in args.refine:
        row = profile_calibration(args.model, source, refine)
        rest = row["calibrate-thresholds"] - sum(row[s] for s in STAGES)
        parts = ", ".join(f"{s} {row[s]:.2f}" for s in STAGES)
        print(f"refine={refine}: calibrate-thresholds {row['calibrate-thresholds']:.2f} s = {parts}, other {rest:.2f}; "
              f"ORT run per window per pass {row['ORT run (+ fetch)'] / len(source) / (1 + refine):.3f} s")


if __name__ == "__main__":
    main()
