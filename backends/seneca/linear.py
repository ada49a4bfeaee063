"""Vectorised execution of linear-tile event handlers, with the interpreter's exact counts.

Numerics: for each token the handler accumulates its events in channel order, rounding the
product and the sum to 16 bit (MAC = MUL + ADD); here all tokens advance together, one
input channel at a time, which gives bit-identical results (a token with no event on a
channel adds nothing).

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
    words = tile.acc_base + tile.row_words + 8
    runs = []
    for events in ([], [Event(tile.k0, F16(0))]):
        core = Core(memory_words=words, registers=registers)
        core.inbox.extend(events)
        run(core, program)
        runs.append(core.counts)
    return runs[0], runs[1] - runs[0]


def run_tile(tile: LinearTile, weights: np.ndarray, x: np.ndarray, registers: int = 64):
    """Run the tile's handler for every token of `x` ([T, k1 - k0] fp16 activations; zeros send
    no event). Returns the outputs [T, n1 - n0] fp16, the executed instruction counts, the
    events received and the events captured (non-zero outputs)."""
    x = np.asarray(x, F16)
    acc = np.zeros((x.shape[0], tile.n1 - tile.n0), F16)
    for j in range(x.shape[1]):
        column = x[:, j]
        if not column.any():
            continue
        acc = (acc + (column[:, None] * weights[j]).astype(F16)).astype(F16)
    events = int(np.count_nonzero(x))
    base, per_event = step_counts(tile, registers)
    counts = collections.Counter({op: n * x.shape[0] for op, n in base.items()})
    counts.update({op: n * events for op, n in per_event.items()})
    return acc, counts, events, int(np.count_nonzero(acc))
