"""Loading and saving models: onnx_ir in memory, protobuf only at the edges.

Loading validates what later passes would otherwise trip over deep inside: a file that is
not ONNX, an opset older than 17, external data that is missing, truncated, or points
outside the model's folder. Saving is atomic: a model is written to a temporary folder and
moved into place only once complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from typing import IO
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
    validate(model, str(path))
    _check_external_data(model, path.parent.resolve())
    return model


def validate(model: ir.Model, path: str) -> ir.Model:
    """SparseccError unless `model` (named `path` in messages) has a graph of an opset sparsecc takes."""
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
def signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP (delivered on exit) while a temporary file or folder is
    made and recorded, so an interrupt cannot fall between its creation and the cleanup that
    owns it and leave it behind."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def scratch_dir(prefix: str, dir: Path | None = None) -> Iterator[Path]:
    """A private temporary folder (in `dir`, else TMPDIR), removed on exit however it comes."""
    tmp = None
    try:
        with signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
        yield tmp
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename,
    on any failure (SIGINT included) it is removed and `out` is left as it was."""
    out = Path(out)
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(f".{out.name}.tmp-", out.parent) as tmp:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        yield tmp
        with scratch_dir(f".{out.name}.old-", out.parent) as old:
            if out.exists():
                out.rename(old / "x")
            try:
                tmp.rename(out)
            except BaseException:
                if (old / "x").exists():  # put the previous output back
                    (old / "x").rename(out)
                raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through `write(f)` into a private temporary file beside `path`, then rename
    it into place: readers (other processes too) see the old file or the whole new one, never
    a part; an interrupted write leaves nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file is an ordinary one
        os.replace(tmp, path)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s lock file (`.NAME.lock` beside it) across processes,
    e.g. so that concurrent sweep cells compute a cache entry once; `waiting()` is called when
    another holder makes this one wait. The lock file stays (removing it would race), but for
    a first use that fails."""
    path = Path(path)
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        except BaseException:
            if created:   # a failed first use leaves no folder behind (at worst a waiter then works twice)
                lock.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()
            raise
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
