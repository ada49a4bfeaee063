"""The graph forms users already hold, in and out: a path to an .onnx file, an
`onnx.ModelProto`, an `onnx_ir.Model` or an `onnx_graphsurgeon.Graph` (the optional
`graphsurgeon` extra), so that sparsecc drops into a graph-editing pipeline without a file.

Everything in between is onnx_ir; the other forms are converted at the edges through the
protobuf, which every one of them reads and writes losslessly (functions such as the
Threshold op's included).
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from sparsecc.errors import SparseccError

FORMS = ("ir", "onnx", "graphsurgeon")


def _graphsurgeon():
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise SparseccError("onnx_graphsurgeon is not installed: pip install -e \".[graphsurgeon]\"") from None
    return gs


def form_of(model) -> str:
    """"path", "onnx", "ir" or "graphsurgeon"; SparseccError for anything else."""
    if isinstance(model, (str, os.PathLike)):
        return "path"
    if isinstance(model, onnx.ModelProto):
        return "onnx"
    if isinstance(model, ir.Model):
        return "ir"
    if type(model).__module__.startswith("onnx_graphsurgeon") and type(model).__name__ == "Graph":
        return "graphsurgeon"
    raise SparseccError(f"cannot take a model of type {type(model).__name__}; pass a path, an onnx.ModelProto, "
                        "an onnx_ir.Model or an onnx_graphsurgeon.Graph")


def to_ir(model) -> ir.Model:
    """An onnx_ir.Model of `model` in any form, validated as a loaded file is; never the caller's
    own object (passes change the model in place)."""
    from sparsecc.model_io import load_model, validate

    form = form_of(model)
    if form == "path":
        return load_model(model)
    if form == "ir":
        proto = ir.to_proto(model)
    elif form == "graphsurgeon":
        proto = _graphsurgeon().export_onnx(model)
    else:
        proto = model
    return validate(ir.from_proto(proto), f"the {form} model")


def to_form(model: ir.Model, form: str):
    """`model` as an "ir" (a copy), "onnx" (ModelProto) or "graphsurgeon" (Graph) model."""
    if form not in FORMS:
        raise SparseccError(f"unknown model form {form!r}; one of {', '.join(FORMS)}")
    proto = ir.to_proto(model)
    if form == "onnx":
        return proto
    if form == "ir":
        return ir.from_proto(proto)
    return _graphsurgeon().import_onnx(proto)


def describe(model) -> str:
    """What a report names as the model's source: its resolved path, or its in-memory form."""
    return str(Path(model).resolve()) if form_of(model) == "path" else f"<{form_of(model)} model in memory>"
