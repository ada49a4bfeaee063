"""ONNX Runtime's spinning threads vs calibration's binning: one calibration copy of SmolLM2-135M,
two sessions (session.intra_op.allow_spinning 1 and 0), each window run and its 120 outputs
binned as calibration does, the two sessions interleaved round by round.

    python benchmarks/calibration_spinning.py            # 4 windows x 256 tokens, 3 rounds

Prints the wall seconds per window (run + binning) of each session in each round; on a shared
machine compare the rows of one round.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "build" / "smollm2-135m" / "model.onnx"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import sparsecc
    from sparsecc import ops, passes, progress
    from sparsecc.calibration import _calibration_copy, bin_counts
    from sparsecc.data import TextWindows
    from sparsecc.runtime import load_session, saved_copy

    progress.set_verbosity(0)
    source = TextWindows(args.data, args.model.parent, seq_len=256, limit=args.windows)
    model = sparsecc.compile_model(args.model, [passes.get("discover-sites")(), passes.get("insert-thresholds")()]).model
    tensors = sorted({n.inputs[0].name for n in model.graph if ops.is_threshold(n)})
    copy, levels = _calibration_copy(model, tensors)
    t = {name: node.inputs[1].const_value.numpy() for name, node in levels.items()}
    with saved_copy(copy) as files:
        sessions = {"spinning": load_session(files[0]), "not spinning": load_session(files[0], spinning=False)}
    feeds = list(source.feeds(["input_ids"]))
    for round_ in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            for feed in feeds:
                for x in session.run(tensors, feed | t):
                    bin_counts(x)
            print(f"round {round_ + 1}: {name:12} {(time.perf_counter() - start) / len(feeds):.3f} s/window", flush=True)


if __name__ == "__main__":
    main()
