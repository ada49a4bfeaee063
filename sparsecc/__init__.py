"""sparsecc: an activation-sparsity compiler for event-driven (neuromorphic) hardware.

    from sparsecc import compile_model, default_pipeline, data_source
    src = data_source("valid.txt", tokenizer="samples/tiny_llama", windows=64)
    result = compile_model("model.onnx", default_pipeline(sparsity=0.5), src, out="out")
"""
__version__ = "0.1.0"

from sparsecc.compiler import compile_model, data_source, evaluate  # noqa: E402
from sparsecc.pipeline import default_pipeline  # noqa: E402

__all__ = ["compile_model", "data_source", "default_pipeline", "evaluate", "__version__"]
