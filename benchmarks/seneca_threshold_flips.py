"""Why the seneca simulator's argmax departs from ONNX Runtime on a thresholded model.

    python benchmarks/seneca_threshold_flips.py /tmp/smolsen0.5 --tokens 64

DIR is written by `sparsecc compile ... --target seneca -o DIR`. On one window of WikiText-2
test it runs ONNX Runtime (graph as written) as the reference and against it: ONNX Runtime
with its graph optimizations (the peer: float32 too, sums in another order), the simulator
with the target as compiled (16-bit values), the same with 32-bit values, and the dense
baseline (thresholds out) in 16 bit against ORT on the model with every threshold at 0. Per
Threshold it prints how many activations are zeroed on one side and kept on the other
("flips") and the first token that flips; then the argmax agreement of each run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def main(argv=None) -> None:
    import onnx_ir as ir

    from sparsecc import compiler, model_io, ops
    from sparsecc.backends.seneca.simulator import Simulator
    from sparsecc.runtime import ort_session
    from sparsecc.backends.seneca.target import load_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    model = model_io.load_model(args.dir / "model.onnx")
    tokenizer = compiler.compiled_config(args.dir / "model.onnx").get("data", {}).get("tokenizer")
    feed = next(iter(compiler.data_source(DATA / "test.txt", tokenizer, args.tokens, 1).feeds(["input_ids"])))
    target_text = (args.dir / "target.toml").read_text()
    wide = args.dir.parent / (args.dir.name + ".float32.toml")
    wide.write_text(target_text.replace('value_format = { value = "float16"', 'value_format = { value = "float32"'))
    thresholds = [n for n in model.graph if ops.is_threshold(n)]
    names = [n.outputs[0].name for n in thresholds]
    logits = model.graph.outputs[0].name
    with ort_session(model, names, optimize=False) as session:
        ref = dict(zip([logits, *names], session.run([logits, *names], feed)))
    runs = {}
    with ort_session(model, names) as session:
        runs["ORT optimized"] = dict(zip([logits, *names], session.run([logits, *names], feed)))
    for label, target in (("16-bit values", load_target(args.dir / "target.toml")), ("32-bit values", load_target(wide))):
        runs[label] = Simulator(model, target).run(feed, keep=tuple(names)).outputs
    wide.unlink()
    print(f"{'threshold':<28} " + " ".join(f"{'flips ' + label:>20}" for label in runs) + f" {'first token (32-bit)':>20}")
    for name in names:
        flips = [(run[name] == 0) != (ref[name] == 0) for run in runs.values()]
        tokens = np.flatnonzero(flips[-1].reshape(-1, flips[-1].shape[-1]).any(axis=1))
        print(f"{name:<28} " + " ".join(f"{int(f.sum()):>20}" for f in flips) + f" {tokens[0] if len(tokens) else '-':>20}")
    for label, out in runs.items():
        print(f"argmax agreement with ORT, {label}: {(out[logits].argmax(-1) == ref[logits].argmax(-1)).mean():.1%}")
    for node in thresholds:  # dense: every threshold at 0 in ORT; the simulator's dense baseline
        node.inputs[1].const_value = ir.tensor(np.zeros((), np.float32), name=node.inputs[1].name)
    with ort_session(model, optimize=False) as session:
        dense_ref = session.run([logits], feed)[0]
    dense = Simulator(model, load_target(args.dir / "target.toml"), dense_baseline=True).run(feed).outputs[logits]
    print(f"argmax agreement with ORT, dense baseline, 16-bit values: {(dense.argmax(-1) == dense_ref.argmax(-1)).mean():.1%}")


if __name__ == "__main__":
    sys.exit(main())
