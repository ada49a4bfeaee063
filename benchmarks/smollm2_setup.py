"""What the SmolLM2 benchmarks share: the model `samples/smollm2/build.py` builds, and 256-token
windows of WikiText-2 (valid for calibration, test for evaluation) with its tokenizer."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
MODEL_DIR = REPO / "build" / "smollm2-135m"


def load(model_dir: Path, calib_windows: int, eval_windows: int) -> tuple:
    """(model.onnx, calibration windows of valid, evaluation windows of test, the dense model's
    perplexity on those test windows); exits with the build command when the model is missing."""
    import sparsecc

    model = model_dir / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"{model} not found: run python samples/smollm2/build.py first")
    calib = sparsecc.data_source(DATA / "valid.txt", model_dir, 256, calib_windows)
    test = sparsecc.data_source(DATA / "test.txt", model_dir, 256, eval_windows)
    return model, calib, test, sparsecc.evaluate(model, test)["result"]["perplexity"]
