"""Vectorised execution of linear-tile event handlers, with the interpreter's exact counts.

Numerics: the handler accumulates 16-bit weights x 16-bit event values in 32-bit registers
and rounds each output to 16 bit when it captures it as an event. Here one float32 matrix
product does all tokens at once: the products are exact in float32 and only the order of
the additions differs from the handler's channel order, so outputs agree with the
interpreter to within one 16-bit rounding step (tested).

A tile with int8 weights and float events unpacks them to floats x 256 (codegen) and scales
by the weight scale and 1/256 at capture, within one 16-bit step of the handler like a float
tile. An integer tile accumulates int8 x int8 products exactly in 32-bit integers, so one exact
matrix product (float64 holds every such sum exactly) equals the handler bit for bit:
float32(sum) x the neuron's 16-bit weight scale x the 16-bit activation scale, rounded to 16
bit at capture.

Counts: the handler's control flow does not depend on data, so one step with E events
executes counts(0 events) + E x (counts(1 event) - counts(0 events)) instructions. Both are
measured by running the emitted program on the reference interpreter, so every executed
instruction is counted from the program itself, never estimated.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np

from sparsecc.backends.seneca.codegen import LinearTile, linear_handler
from sparsecc.backends.seneca.isa import assemble
from sparsecc.backends.seneca.program import event_counts

F16 = np.float16


def step_counts(tile: LinearTile, registers: int = 64) -> tuple[collections.Counter, collections.Counter]:
    """(instructions of a step with no event, extra instructions per event) of the tile's handler."""
    return _shape_counts(handler_shape(tile), registers)


def handler_shape(tile: LinearTile) -> LinearTile:
    """The tile with only what decides its handler's control flow: its width and kind. Its name,
    rows, addresses, route and scale are immediates of the same instructions, so every tile of a
    shape executes the same counts, measured once (a model has thousands of tiles, few shapes)."""
    return dataclasses.replace(tile, name="", k0=0, k1=1, n0=0, n1=tile.n1 - tile.n0, weight_base=0, route=0,
                               event_scale=0)


@functools.lru_cache(maxsize=None)
def _shape_counts(tile: LinearTile, registers: int) -> tuple[collections.Counter, collections.Counter]:
    return event_counts(tuple(assemble(linear_handler(tile, registers))), registers)


def counts_over(base: collections.Counter, per_event: collections.Counter, events: np.ndarray) -> collections.Counter:
    """Instructions over a window of a handler that executes `base` per step and `per_event` per event."""
    counts = collections.Counter({op: n * len(events) for op, n in base.items()})
    counts.update({op: n * int(np.sum(events)) for op, n in per_event.items()})
    return counts


def round16(x: np.ndarray) -> np.ndarray:
    """A float32 array of the 16-bit floats nearest to `x` (beyond the 16-bit range: +-inf).

    Large arrays go through ONNX Runtime's Cast pair: the same IEEE round-to-nearest-even
    conversion (checked bit for bit on every float32 near the 16-bit edges), vectorised,
    where NumPy converts one value at a time (10x slower: the simulator's largest cost)."""
    x = np.asarray(x, np.float32)
    if x.size < _ORT_ROUNDING_FROM:
        with np.errstate(over="ignore"):
            return x.astype(F16).astype(np.float32)
    return _rounding_session().run(None, {"x": np.ascontiguousarray(x)})[0]


_ORT_ROUNDING_FROM = 4096   # below this, a session call costs more than NumPy's conversion


@functools.cache
def _rounding_session():
    """float32 -> float16 -> float32 as an ONNX Runtime session (as written: no fusion of the pair)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "round16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32)


# The target's `numerics.value_format`: how values are rounded in memory, events and the NoC.
VALUE_FORMATS = {"float16": round16, "float32": as_float32}


def window_counts(tile: LinearTile, events: np.ndarray, registers: int = 64) -> collections.Counter:
    """Instructions the tile's handler executes over a window, `events[t]` events at step t."""
    return counts_over(*step_counts(tile, registers), events)


def run_tile(tile: LinearTile, weights: np.ndarray, x: np.ndarray, registers: int = 64, round=round16,
             scale: np.ndarray | None = None, event_scale: float = 1.0):
    """Run the tile's handler for every token of `x` ([T, k1 - k0] activations, 16-bit values,
    or int8 for an integer tile; int8 `weights` come with per-neuron `scale`s and the second
    factor `event_scale` (the activation scale, or 1/256 with float events), in the value format);
    zeros send no event). Returns the outputs [T, n1 - n0] (float32 holding `round`ed values),
    the executed instruction counts, the events received per token and the events captured
    (non-zero outputs)."""
    if tile.float_events:   # int8 weights x 256 as floats, 16-bit events
        x = np.asarray(x, np.float32)
        acc = x @ (np.asarray(weights, np.float32) * np.float32(256))
        out = round(acc * np.asarray(scale, np.float32) * np.float32(event_scale))
    elif tile.int8:
        acc = np.asarray(x, np.float64) @ np.asarray(weights, np.float64)   # exact integers (|sum| < 2^31 for k < 2^17)
        out = round(acc.astype(np.float32) * np.asarray(scale, np.float32) * np.float32(event_scale))
    else:
        x = np.asarray(x, np.float32)
        out = round(x @ np.asarray(weights, np.float32))
    events = np.count_nonzero(x, axis=1)
    return out, window_counts(tile, events, registers), events, int(np.count_nonzero(out))


def tile_memory(tile: LinearTile, weights: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """The tile's data-memory words from `tile.weight_base` on: its weight rows [k1 - k0, n1 - n0]
    padded to whole groups (integer tiles: neurons j and j + 8 of a group share word j), then
    an integer tile's 16-bit scales."""
    rows = tile.k1 - tile.k0
    if not tile.int8:
        padded = np.zeros((rows, tile.row_words), F16)
        padded[:, : tile.n1 - tile.n0] = weights
        return padded.view(np.uint16).ravel()
    q = np.zeros((rows, tile.groups * 16), np.int8)
    q[:, : tile.n1 - tile.n0] = weights
    pairs = q.reshape(rows, tile.groups, 2, 8).transpose(0, 1, 3, 2)      # [row, group, lane, lo/hi]
    scales = np.zeros(tile.groups * 16, F16)
    scales[: tile.n1 - tile.n0] = scale
    return np.concatenate([np.ascontiguousarray(pairs).view(np.uint16).ravel(), scales.view(np.uint16)])
