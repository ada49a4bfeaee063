"""sparsecc: an activation-sparsity compiler for event-driven (neuromorphic) hardware.

    from sparsecc import compile_model, default_pipeline, data_source
    src = data_source("valid.txt", tokenizer="samples/tiny_llama", windows=64)
    result = compile_model("model.onnx", default_pipeline(sparsity=0.5), src, out="out")
"""
__version__ = "0.1.0"

__all__ = ["compile_model", "data_source", "default_pipeline", "evaluate", "__version__"]
# Loaded on first use, so the command starts (and can be interrupted) before numpy and onnx load.
_LAZY = {"compile_model": "sparsecc.compiler", "data_source": "sparsecc.compiler", "evaluate": "sparsecc.compiler",
         "default_pipeline": "sparsecc.pipeline"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsecc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
