"""Loading and saving models: onnx_ir in memory, protobuf only at the edges.

Loading validates what later passes would otherwise trip over deep inside: a file that is
not ONNX, an opset older than 17, external data that is missing, truncated, or points
outside the model's folder. Saving is atomic: a model is written to a temporary folder and
moved into place only once complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from sparsecc.errors import SparseccError

MIN_OPSET = 17
# Above this many bytes of weights a model is saved with its tensors in `<name>.data` beside
# it: protobuf cannot hold 2 GiB, and ONNX Runtime maps external data instead of copying it.
EXTERNAL_DATA_BYTES = 256 * 2**20


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and validate an ONNX model; raise SparseccError with the fix on any problem."""
    path = Path(path)
    if not path.exists():
        raise SparseccError(f"model file not found: {path}; check the path")
    if not path.is_file():
        raise SparseccError(f"{path} is a directory; pass the .onnx file inside it")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends carry no useful line
        raise SparseccError(f"{path} is not a valid ONNX model ({type(exc).__name__}); "
                            "check the path or re-export the model") from None
    if len(model.graph) == 0 or not model.graph.outputs:
        raise SparseccError(f"{path} holds no ONNX graph (empty or not an ONNX file); check the path")
    opset = model.opset_imports.get("", model.graph.opset_imports.get("", 0))
    if opset < MIN_OPSET:
        raise SparseccError(f"{path} uses opset {opset}; sparsecc needs opset {MIN_OPSET} or newer: "
                            f"re-export with opset_version>={MIN_OPSET} or convert it with "
                            "onnx.version_converter.convert_version")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest or model.ir_version > onnx.IR_VERSION:
        what = f"opset {opset}" if opset > newest else f"IR version {model.ir_version}"
        raise SparseccError(f"{path} uses {what}, newer than onnx {onnx.__version__} knows (opset {newest}, IR "
                            f"version {onnx.IR_VERSION}); re-export it for opset {newest} or upgrade onnx and onnxruntime")
    _check_external_data(model, path.parent.resolve())
    return model


def _check_external_data(model: ir.Model, base: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = (base / tensor.location).resolve()
        if os.path.isabs(tensor.location) or not location.is_relative_to(base):
            raise SparseccError(f"initializer {value.name!r} points outside the model's folder "
                                f"({tensor.location}); refusing to read it: keep external data beside the model")
        if not location.is_file():
            raise SparseccError(f"external data file {location} is missing (needed by initializer "
                                f"{value.name!r}); copy it next to the model")
        if tensor.length is not None and tensor.offset + tensor.length > location.stat().st_size:
            raise SparseccError(f"external data file {location} is truncated (initializer {value.name!r} "
                                "ends past its end); copy it again")


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer of `graph` holding `array`."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def earliest(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The first of `nodes` in the graph's (topological) order: where a value they all read
    must be computed before."""
    if len(nodes) == 1:
        return nodes[0]
    wanted = {id(n) for n in nodes}
    return next(n for n in graph if id(n) in wanted)


def remove_unused(graph: ir.Graph) -> None:
    """Drop the nodes and initializers nothing reads any more (e.g. replaced float weights)."""
    for node in reversed(list(graph)):
        if not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        del graph.initializers[name]


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: str | os.PathLike) -> list[Path]:
    """Write `model` to `path` (external data beside it when large); return the files written.
    Callers write into a fresh folder (see `atomic_dir`), so a failure leaves nothing behind."""
    path = Path(path)
    data = path.name + ".data"
    if weight_bytes(model) > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=data)
        return [path, path.with_name(data)]
    # Small models carry all weights inline; bring any external tensors into memory first.
    with _inline_tensors(model):
        ir.save(model, path)
    return [path]


@contextlib.contextmanager
def _inline_tensors(model: ir.Model) -> Iterator[None]:
    external = [(v, v.const_value) for v in model.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)]
    for value, tensor in external:
        value.const_value = ir.tensor(tensor.numpy(), name=tensor.name)
    try:
        yield
    finally:
        for value, tensor in external:
            value.const_value = tensor


def model_files(path: str | os.PathLike) -> list[Path]:
    """A saved model's file and the external-data files its initializers name."""
    path = Path(path)
    model = load_model(path)
    locations = {v.const_value.location for v in model.graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    return [path, *(path.parent / location for location in sorted(locations))]


def fingerprint(files: list[Path]) -> str:
    """sha256 over the bytes of `files`: identifies a saved model for caching."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


MARKER = "report.json"  # a folder holding this was written by sparsecc and may be replaced


def check_output_dir(out: Path) -> None:
    """Fail before any work when `out` cannot be (re)placed."""
    if out.exists() and not out.is_dir():
        raise SparseccError(f"output path {out} is a file; choose a folder with -o")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SparseccError(f"output folder {out} exists and was not written by sparsecc; "
                            "choose another -o or empty it")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename,
    on any failure (SIGINT included) it is removed and `out` is left as it was."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
