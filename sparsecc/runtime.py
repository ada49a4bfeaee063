"""Handing an in-memory model to ONNX Runtime.

The IR is saved into a private temporary folder (external data beside it when large, so
models over 2 GiB work) and ONNX Runtime maps it from there. Extra outputs, for
calibration and measurement, are added for the session only and removed afterwards.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx_ir as ir

from sparsecc.errors import SparseccError
from sparsecc.model_io import save_model, scratch_dir
from sparsecc.stepgraph import METADATA_KEY, StepSession, parse_spec


_threads: int | None = None   # intra-op threads per session; None: ONNX Runtime's default (every core)


def set_threads(count: int | None) -> None:
    """Threads of every ONNX Runtime session made from now on in this process (a sweep cell
    uses the CPUs Ray gave it, so cells side by side do not oversubscribe the cores)."""
    global _threads
    _threads = count


def session_options():
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4   # fatal only: errors reach the user as one SparseccError line
    # Run Q/DQ pairs as written (integers held in float), not fused into ORT's integer
    # kernels: on x86 CPUs without VNNI those multiply u8 x s8 pairs with VPMADDUBSW, whose
    # 16-bit pair sums saturate for full-range int8 weights, so the same w8a8 model gave
    # other logits there (2.6x the error of a VNNI machine on the tiny Llama). Unfused, every
    # machine computes the graph's own semantics, which is what the chip's exact int32 MACs do.
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if _threads is not None:
        opts.intra_op_num_threads = _threads
    return opts


@contextlib.contextmanager
def saved_copy(model: ir.Model, extra_outputs: Sequence[str] = ()) -> Iterator[list[Path]]:
    """Save `model` (with `extra_outputs` as graph outputs) to a temporary folder; yield the
    files. The model is restored on exit, and the folder removed."""
    values = values_by_name(model.graph)
    missing = [name for name in extra_outputs if name not in values]
    if missing:
        raise SparseccError(f"tensor {missing[0]!r} is not in the model")
    outputs = model.graph.outputs
    added = [values[name] for name in extra_outputs if not values[name].is_graph_output()]
    outputs.extend(added)
    try:
        with scratch_dir("sparsecc-ort-") as tmp:
            yield save_model(model, tmp / "model.onnx")
    finally:
        for value in added:
            outputs.remove(value)


def load_session(path: Path, optimize: bool = True, spinning: bool = True):
    """An ONNX Runtime CPU session on a saved model, with a one-line error on failure; for a
    step graph, a `StepSession` that runs a window of tokens one by one. Without
    `optimize`, ORT runs the graph as written (its fusions can change numerics, e.g. the
    DequantizeLinear + MatMul fusion quantizes the activations). Without `spinning`, ORT's
    idle threads sleep instead of busy-waiting for work: for a caller that does work of its
    own between runs (calibration bins every output), a spinning thread takes that work's
    core (results are the same either way)."""
    import onnxruntime as ort

    options = session_options()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SparseccError(f"ONNX Runtime {ort.__version__} cannot load the model: {_one_line(exc)}; "
                            "check its opset, IR version and operators") from None
    session = CheckedSession(session)
    step = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return StepSession(session, parse_spec(step)) if step is not None else session


class CheckedSession:
    """An ONNX Runtime session whose failures while running (feeds of the wrong shape or type,
    token ids outside the vocabulary, ...) come as a one-line SparseccError naming the cause."""

    def __init__(self, session):
        self._session = session

    def run(self, output_names, feed, *args, **kwargs):
        try:
            return self._session.run(output_names, feed, *args, **kwargs)
        except _ort_errors() as exc:
            raise SparseccError(f"ONNX Runtime cannot run the model on this data: {_one_line(exc)}; check that the "
                                "data fits the model's inputs (names, shapes, types, token ids within its "
                                "vocabulary)") from exc

    def __getattr__(self, name):
        return getattr(self._session, name)


def _ort_errors() -> tuple[type, ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception))


def _one_line(exc: Exception) -> str:
    """ONNX Runtime's message on one line, without its status prefix, temporary paths and C++
    source locations."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed: ?", "", text)
    return re.sub(r"/onnxruntime_src/\S+:\d+ .*?\) (?=\S)", "", text).strip()


@contextlib.contextmanager
def ort_session(model: ir.Model, extra_outputs: Sequence[str] = (), optimize: bool = True):
    """An ONNX Runtime session on `model` that also returns `extra_outputs`."""
    with saved_copy(model, extra_outputs) as files:
        yield load_session(files[0], optimize)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs}
    values.update(graph.initializers)
    for node in graph:
        for out in node.outputs:
            values[out.name] = out
    return values

