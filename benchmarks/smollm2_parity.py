"""Exported SmolLM2-135M in ONNX Runtime vs the PyTorch model: perplexity on the same windows.

    python samples/smollm2/build.py                       # once: builds build/smollm2-135m/
    python benchmarks/smollm2_parity.py --windows 64      # WikiText-2 test, 256-token windows

Both runs see identical token windows (sparsecc.data.TextWindows: evenly spread over the
text, each started the way the tokenizer starts a text). Prints both perplexities and their
relative difference; the export is faithful when that is well under 0.5%.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "samples" / "smollm2"))


def main(argv=None) -> None:
    import torch

    import build as smollm2
    from sparsecc.data import TextWindows
    from sparsecc.metrics import Perplexity
    from sparsecc.model_io import load_model
    from sparsecc.runtime import ort_session

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=smollm2.DEFAULT_OUT)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64, help="0: every window of the text")
    args = ap.parse_args(argv)

    source = TextWindows(args.data, args.model_dir, seq_len=args.seq_len, limit=args.windows or None)
    from sparsecc.export import load_causal_lm

    torch_model, _ = load_causal_lm(smollm2.gguf_path())
    torch_ppl, ort_ppl = Perplexity(), Perplexity()
    start = time.perf_counter()
    with ort_session(load_model(args.model_dir / "model.onnx")) as session:
        for i, feed in enumerate(source.feeds(["input_ids"])):
            ids = feed["input_ids"]
            ort_ppl.add(session.run(["logits"], feed)[0], ids)
            with torch.no_grad():
                torch_ppl.add(torch_model(input_ids=torch.from_numpy(ids)).logits.numpy(), ids)
            if (i + 1) % 16 == 0:
                print(f"  {i + 1}/{len(source)} windows", file=sys.stderr, flush=True)
    diff = ort_ppl.value / torch_ppl.value - 1
    print(f"windows: {len(source)} x {args.seq_len} tokens of {args.data.name} (BOS: {source.tokenizer.bos_id}), "
          f"{ort_ppl.tokens} predicted tokens, {time.perf_counter() - start:.0f} s")
    print(f"{'PyTorch (transformers, GGUF weights)':40} perplexity {torch_ppl.value:.4f}")
    print(f"{'ONNX Runtime (exported model.onnx)':40} perplexity {ort_ppl.value:.4f}")
    print(f"relative difference: {100 * diff:+.4f}%  ({'within' if abs(diff) < 0.005 else 'OUTSIDE'} 0.5%)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
