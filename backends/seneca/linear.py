"""Vectorised execution of linear-tile event handlers, with the interpreter's exact counts.

Numerics: the handler accumulates 16-bit weights x 16-bit event values in 32-bit registers
and rounds each output to 16 bit when it captures it as an event. Here one float32 matrix
product does all tokens at once: the products are exact in float32 and only the order of
the additions differs from the handler's channel order, so outputs agree with the
interpreter to within one 16-bit rounding step (tested).

Counts: the handler's control flow does not depend on data, so one step with E events
executes counts(0 events) + E x (counts(1 event) - counts(0 events)) instructions. Both are
measured by running the emitted program on the reference interpreter, so every executed
instruction is counted from the program itself, never estimated.
"""
from __future__ import annotations

import collections
import functools

import numpy as np

from sparsecc.backends.seneca.codegen import LinearTile, linear_handler
from sparsecc.backends.seneca.interpreter import Core, Event, run
from sparsecc.isa import assemble

F16 = np.float16


@functools.lru_cache(maxsize=None)
def step_counts(tile: LinearTile, registers: int = 64) -> tuple[collections.Counter, collections.Counter]:
    """(instructions of a step with no event, extra instructions per event) of the tile's handler."""
    program = assemble(linear_handler(tile, registers))
    words = tile.buffer_base + tile.buffer_words + 8
    runs = []
    for events in ([], [Event(tile.k0, F16(0))]):
        core = Core(memory_words=words, registers=registers)
        core.inbox.extend(events)
        run(core, program)
        runs.append(core.counts)
    return runs[0], runs[1] - runs[0]


def round16(x: np.ndarray) -> np.ndarray:
    """A float32 array of the 16-bit floats nearest to `x` (beyond the 16-bit range: +-inf)."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(F16).astype(np.float32)


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32)


# The target's `numerics.value_format`: how values are rounded in memory, events and the NoC.
VALUE_FORMATS = {"float16": round16, "float32": as_float32}


def window_counts(tile: LinearTile, events: np.ndarray, registers: int = 64) -> collections.Counter:
    """Instructions the tile's handler executes over a window, `events[t]` events at step t."""
    base, per_event = step_counts(tile, registers)
    counts = collections.Counter({op: n * len(events) for op, n in base.items()})
    counts.update({op: n * int(np.sum(events)) for op, n in per_event.items()})
    return counts


def run_tile(tile: LinearTile, weights: np.ndarray, x: np.ndarray, registers: int = 64, round=round16):
    """Run the tile's handler for every token of `x` ([T, k1 - k0] activations, 16-bit values;
    zeros send no event). Returns the outputs [T, n1 - n0] (float32 holding `round`ed values),
    the executed instruction counts, the events received per token and the events captured
    (non-zero outputs)."""
    x = np.asarray(x, np.float32)
    out = round(x @ np.asarray(weights, np.float32))
    events = np.count_nonzero(x, axis=1)
    return out, window_counts(tile, events, registers), events, int(np.count_nonzero(out))
