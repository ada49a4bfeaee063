"""sparsecc: an activation-sparsity compiler for event-driven (neuromorphic) hardware.

    from sparsecc import compile_model, default_pipeline, data_source
    src = data_source("valid.txt", tokenizer="samples/tiny_llama", windows=64)
    result = compile_model("model.onnx", default_pipeline(sparsity=0.5), src, out="out")
"""
import importlib

__version__ = "0.1.0"

# The API is imported on first use, so `sparsecc --version`, `--help` and usage errors do
# not wait for onnx_ir, ONNX Runtime and numpy.
_API = {"compile_model": "sparsecc.compiler", "data_source": "sparsecc.compiler", "evaluate": "sparsecc.compiler",
        "default_pipeline": "sparsecc.pipeline"}

__all__ = ["compile_model", "data_source", "default_pipeline", "evaluate", "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    try:  # `import sparsecc; sparsecc.model_io` keeps working
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
