"""Loading and saving models: onnx_ir in memory, protobuf only at the edges.

Loading validates what later passes would otherwise trip over deep inside: a file that is
not ONNX, an opset older than 17, external data that is missing, truncated, or points
outside the model's folder. Saving is atomic: a model is written to a temporary folder and
moved into place only once complete.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import math
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from sparsecc.errors import SparseccError, excerpt

MIN_OPSET = 17
# Above this many bytes of weights a model is saved with its tensors in `<name>.data` beside
# it: protobuf cannot hold 2 GiB, and ONNX Runtime maps external data instead of copying it.
EXTERNAL_DATA_BYTES = 256 * 2**20


MODEL_FILE = "model.onnx"   # the model of a `sparsecc compile -o OUT` folder


def model_file(path: str | os.PathLike) -> Path:
    """The ONNX file a model argument names: the file itself, or the model.onnx of a compile
    output folder. Every command that takes a model resolves it here."""
    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise SparseccError(f"{path} is a folder without {MODEL_FILE}; pass an .onnx file or the -o folder "
                                "of `sparsecc compile`")
        return path / MODEL_FILE
    if not path.exists():
        raise SparseccError(f"model file not found: {path}; check the path")
    return path


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and validate an ONNX model (a file, or a compile output folder: `model_file`);
    raise SparseccError with the fix on any problem."""
    path = model_file(path)
    if not path.is_file():
        raise SparseccError(f"{path} is not a regular file; pass an .onnx file")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends carry no useful line
        raise SparseccError(f"{path} is not a valid ONNX model ({type(exc).__name__}); "
                            "check the path or re-export the model") from None
    validate(model, str(path))
    _check_external_data(model, path.parent.resolve(), path.resolve())
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
    _check_tensor_sizes(model)
    return model


def _check_tensor_sizes(model: ir.Model) -> None:
    """Every initializer holds the bytes its header declares (dims of 2^40 over a few bytes
    would crash a save or a read much later), and no linear layer's weight is empty."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):  # no fixed width
            continue
        declared = -(-math.prod(tensor.shape.numpy()) * tensor.dtype.bitwidth // 8)
        held = _held_bytes(tensor)
        if held is None and not isinstance(tensor, ir.ExternalTensor) and declared >= 2**31:
            held = "at most 2 GiB (an inline tensor's protobuf limit), so fewer"
        if held is not None and held != declared:
            raise SparseccError(f"initializer {value.name!r} declares shape {list(tensor.shape.numpy())} "
                                f"({declared} bytes) but holds {held} bytes: a corrupt tensor header; re-export the model")
        if declared == 0 and any(use.node.op_type in ("MatMul", "Gemm") for use in value.uses()):
            raise SparseccError(f"initializer {value.name!r} (a {value.uses()[0].node.op_type} weight) has shape "
                                f"{list(tensor.shape.numpy())}: no elements; re-export the model with a real weight")


def _held_bytes(tensor: ir.TensorProtocol) -> int | None:
    """The bytes an initializer really has (None where only decoding would tell)."""
    if isinstance(tensor, ir.ExternalTensor):
        return tensor.length
    proto = getattr(tensor, "raw", None)
    if isinstance(proto, onnx.TensorProto) and proto.HasField("raw_data"):
        return len(proto.raw_data)
    return None


def _check_external_data(model: ir.Model, base: Path, model_file: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if "\x00" in tensor.location or not tensor.location:
            raise SparseccError(f"initializer {value.name!r} names an invalid external-data location "
                                f"({excerpt(tensor.location)}); re-export the model with its data beside it")
        location = (base / tensor.location).resolve()
        if location == model_file:
            raise SparseccError(f"initializer {value.name!r} reads its external data from the model file itself "
                                f"({tensor.location}); re-export the model with its data in a file of its own")
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


def input_files(path: str | os.PathLike) -> list[Path]:
    """The model file at `path` and the external-data files it names, read without loading
    the weights (the files an output must not replace; [path] if it cannot be read)."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model: loading it reports that, later
        return [path]
    locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                 if entry.key == "location" and "\x00" not in entry.value}
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


def check_output_dir(out: str | os.PathLike, reads: Iterable[str | os.PathLike] = (), marker: str = MARKER,
                     what: str = "output folder") -> None:
    """Fail, in one line and before any work, when `out` cannot be (re)placed: it is a file, a
    folder not written by sparsecc (no `marker`), the current folder or one holding it (`-o .`,
    `-o ""`), under a file, or somewhere this process cannot write; or when it is, holds, or
    lies in a folder of what the command reads (`reads`: models, their external data, data,
    tokenizers, pipeline files), which replacing it would destroy."""
    out = Path(out)
    here, target = Path.cwd().resolve(), out.resolve()
    if here.is_relative_to(target):
        raise SparseccError(f"{what} {out} is the current folder or holds it; "
                            "name a new folder with -o, e.g. -o out")
    if out.exists() and not out.is_dir():
        raise SparseccError(f"output path {out} is a file; choose a folder with -o")
    for read in reads:
        source = Path(read).resolve()
        if source.is_relative_to(target) or (source.is_dir() and target.is_relative_to(source)):
            where = "is" if source == target else "holds" if source.is_relative_to(target) else "is inside"
            raise SparseccError(f"{what} {out} {where} {read}, which this command reads: writing it would "
                                "destroy its own input; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise SparseccError(f"{what} {out} exists and was not written by sparsecc; "
                            "choose another -o or empty it")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SparseccError(f"cannot create {what} {out}: {parent} is a file, not a folder; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(parent) else "permission denied"
        raise SparseccError(f"cannot write {what} {out}: {parent} is not writable ({reason}); choose another -o")


def _read_only(folder: Path) -> bool:
    return bool(getattr(os, "ST_RDONLY", 0) and os.statvfs(folder).f_flag & os.ST_RDONLY)


# Errors of writing a file that no retry fixes: disk full, quota, file-size limit (ulimit -f:
# Python ignores SIGXFSZ, so the write fails with EFBIG), read-only or forbidden folder.
WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "a file exceeds the file-size limit (ulimit -f)", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def write_error(exc: BaseException, what: str | os.PathLike, within: Path | None = None,
                fix: str = "free some space, raise the limit or choose another -o") -> SparseccError | None:
    """The one-line error for `exc` when it is a failed write of `what` (None for any other
    error), e.g. `cannot write out/model.onnx: no space left on the device; ...`. A permission
    error counts only on a file `within` that folder (else it was a read)."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRORS:
        return None
    if exc.errno in (errno.EACCES, errno.EPERM) and within is not None and exc.filename is not None \
            and not Path(os.fsdecode(exc.filename)).resolve().is_relative_to(within.resolve()):
        return None
    return SparseccError(f"cannot write {exc.filename or what}: {WRITE_ERRORS[exc.errno]}; {fix}")


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
    with write_errors(out):
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


@contextlib.contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """Turn a failed write under `out`'s folder (disk full, file-size limit, read-only) into
    its one-line SparseccError; the temporary files are gone by then (removed on the way out)."""
    try:
        yield
    except OSError as exc:
        error = write_error(exc, out, within=out.parent)
        if error is None:
            raise
        raise error from None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through `write(f)` into a private temporary file beside `path`, then rename
    it into place: readers (other processes too) see the old file or the whole new one, never
    a part; an interrupted write leaves nothing."""
    path = Path(path)
    tmp = None
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
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
