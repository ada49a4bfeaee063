"""The linear-tile event handler, run on the reference ISA interpreter: its outputs equal a
NumPy model of the same arithmetic (16-bit values, 32-bit registers), zero activations cost nothing, and the executed
instruction counts follow the emitted program exactly."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from sparsecc.backends.seneca.codegen import LinearTile, linear_handler
from sparsecc.backends.seneca.interpreter import Core, Event, run
from sparsecc.backends.seneca.linear import round16, run_tile, step_counts, tile_memory

from sparsecc.backends.seneca.isa import assemble

F16 = np.float16


def load_tile(tile: LinearTile, weights: np.ndarray, core: Core, scale=None) -> None:
    """Write weights[k0:k1, n0:n1] (and an integer tile's scales) where the handler reads them."""
    words = tile_memory(tile, weights[tile.k0:tile.k1, tile.n0:tile.n1], None if scale is None else scale[tile.n0:tile.n1])
    core.memory[tile.weight_base: tile.weight_base + words.size] = words


def reference(tile, weights, events):
    acc = np.zeros(tile.n1 - tile.n0, np.float32)
    for e in events:  # MAC in a 32-bit register, in event order; rounded to 16 bit on capture
        acc = acc + weights[e.channel, tile.n0:tile.n1].astype(np.float32) * np.float32(e.value)
    return acc.astype(F16)


def simulate(tile, weights, events, registers=64, scale=None):
    core = Core(memory_words=1 << 14, registers=registers)
    load_tile(tile, weights, core, scale)
    core.inbox.extend(events)
    run(core, assemble(linear_handler(tile, registers=registers)))
    return core


@pytest.mark.parametrize("registers", [64, 10])   # 10: two register blocks, events replayed from memory
@pytest.mark.parametrize("n0, n1", [(0, 20), (4, 13)])
def test_handler_matches_reference(registers, n0, n1):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((12, 24)).astype(F16)
    tile = LinearTile("t", 2, 10, n0, n1, weight_base=64)
    x = rng.standard_normal(12).astype(F16)
    x[[3, 5, 6]] = 0                                   # sparse activations send no event
    events = [Event(c, x[c]) for c in range(tile.k0, tile.k1) if x[c] != 0]
    core = simulate(tile, weights, events, registers)
    want = reference(tile, weights, events)
    out = np.zeros(n1 - n0, F16)
    (route, sent), = core.sent
    for e in sent:
        out[e.channel - n0] = e.value
    np.testing.assert_array_equal(out, want)
    assert {e.channel for e in sent} == {n0 + i for i in np.flatnonzero(want)}
    # Per event the handler runs RECV, ADDX, MULX, ADDX, VSET, JMP and, per group, MLD + MAC;
    # with several register blocks it buffers each event (2 SW) and replays it per block (2 LW).
    groups, blocks = tile.groups, -(-tile.groups // (registers - 8))
    assert core.counts["RECV"] == len(events) + 1
    assert core.counts["MAC"] == core.counts["MLD"] == len(events) * groups
    assert core.counts["MST"] == 0
    assert core.counts["SW"] == (2 * len(events) if blocks > 1 else 0)
    assert core.counts["LW"] == (2 * len(events) * blocks if blocks > 1 else 0)
    assert core.counts["EVC"] == groups and core.events_captured == len(sent)


def test_no_events_no_work():
    tile = LinearTile("t", 0, 8, 0, 16, weight_base=0)
    core = simulate(tile, np.ones((8, 16), F16), [])
    assert core.counts["MAC"] == 0 and core.counts["MLD"] == 0 and core.sent == [(0, [])]


def test_golden_assembly():
    assert linear_handler(LinearTile("q", 0, 4, 0, 12, 0)) == """\
; linear tile q: k[0:4] x n[0:12], 2 groups in 1 register block
    LI    x1, 0
    LI    x2, 16
    LI    x9, 0
    SUB   r8, r8, r8
    SUB   r9, r9, r9
event:
    RECV  x3, x4, end
    ADDX  x3, x3, x9
    MULX  x5, x3, x2
    ADDX  x5, x5, x1
    VSET  r0, x4
    MLD   r1, [x5+0]
    MAC   r8, r1, r0
    MLD   r1, [x5+8]
    MAC   r9, r1, r0
    JMP   event
end:
    LI    x6, 0
    EVC   r8, x6
    ADDI  x6, x6, 8
    EVC   r9, x6
    ADDI  x6, x6, 8
    SEND  0
    SYNC  0
    HALT
"""


def test_interpreter_semantics():
    core = Core(memory_words=64)
    core.memory[0:8] = np.arange(1, 9, dtype=F16).view(np.uint16)
    core.memory[8:16] = np.array([0x0102, 0x7F01, 0xFF80, 0, 0, 0, 0, 0x0101], np.uint16)
    run(core, assemble("""
        LI    x1, 0
        LI    x2, 3
        MLD   r1, [x1+0]        ; 1..8
        LOOP  x2, 1
        ADD   r2, r2, r1        ; 3 x (1..8)
        GTH   r3, r2, r1        ; all 1
        MAX   r4, r1, r2
        RND   r5, r4
        MLD   r6, [x1+8]        ; packed int8 pairs
        ADD8  r7, r6, r6
        MAC8  r10, r6, r6       ; widening: r10 += lo x lo, r11 += hi x lo (32-bit integers)
        MAC8  r10, r6, r6
        I2FW  r12, r11
        F2I   r13, r4           ; 3 x (1..8), saturated at 127 -> int words
        I2F   r14, r13
        SHL   r8, r3, 1
        AND   r9, r8, r8
        LW    x3, [x1+8]
        ADDI  x3, x3, 1
        SW    x3, [x1+40]
        LI    x4, 5
        LI    x5, 0
    top:
        ADDI  x5, x5, 1
        BNE   x5, x4, top
        EVC   r3, x4
        SEND  7
        HALT
    """))
    np.testing.assert_array_equal(core.r[2], 3 * np.arange(1, 9, dtype=np.float32))
    np.testing.assert_array_equal(core.r[3], np.ones(8, np.float32))
    np.testing.assert_array_equal(core.r[4], core.r[2])
    pairs = core.memory[8:16].view(np.int8).astype(np.int16)
    np.testing.assert_array_equal(core.r[7].astype(F16).view(np.int8), (2 * pairs).astype(np.int8))
    lo, hi = pairs.reshape(8, 2).T.astype(np.int32)
    np.testing.assert_array_equal(core.ri[10], 2 * lo * lo)
    np.testing.assert_array_equal(core.ri[11], 2 * hi * lo)
    np.testing.assert_array_equal(core.r[12], (2 * hi * lo).astype(np.float32))
    np.testing.assert_array_equal(core.r[14], 3 * np.arange(1, 9, dtype=np.float32))
    assert core.r[8].astype(F16).view(np.uint16)[0] == (np.array(1, F16).view(np.uint16) << 1)
    assert core.memory[40] == 0x0103 and core.x[5] == 5
    assert core.counts["ADD"] == 3 and core.counts["BNE"] == 5
    assert [(e.channel, float(e.value)) for e in core.sent[0][1]] == [(5 + i, 1.0) for i in range(8)]


@pytest.mark.parametrize("registers", [64, 10])
def test_vectorised_tile_equals_interpreter(registers):
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((16, 30)).astype(F16)
    tile = LinearTile("t", 3, 14, 5, 27, weight_base=32)
    x = rng.standard_normal((5, 16)).astype(F16)
    x[np.abs(x) < 0.7] = 0                           # about half the activations are events
    x[2] = 0                                          # a token with no event at all
    out, counts, events, captured = run_tile(tile, weights[tile.k0:tile.k1, tile.n0:tile.n1], x[:, tile.k0:tile.k1], registers)
    want_counts, want_events, want_captured = collections.Counter(), 0, 0
    for t in range(len(x)):
        step = [Event(c, x[t, c]) for c in range(tile.k0, tile.k1) if x[t, c] != 0]
        core = simulate(tile, weights, step, registers)
        got = np.zeros(tile.n1 - tile.n0, F16)
        for e in core.sent[0][1]:
            got[e.channel - tile.n0] = e.value
        # one float32 product vs the handler's event order: at most one 16-bit rounding step apart
        np.testing.assert_array_max_ulp(out[t].astype(F16), got, maxulp=1)
        want_counts += core.counts
        want_events += len(step)
        want_captured += core.events_captured
    assert counts == want_counts
    assert (int(events.sum()), captured) == (want_events, want_captured)


@pytest.mark.parametrize("registers", [64, 12])   # 12: two accumulators per group, several register blocks
@pytest.mark.parametrize("n0, n1", [(0, 40), (5, 22)])
def test_integer_tile_handler_equals_vectorised_exactly(registers, n0, n1):
    """int8 weights x int8 events: 32-bit integer sums are exact, so the interpreter and the
    vectorised tile agree bit for bit; one MLD + one MAC8 per 16 neurons per event."""
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, (12, 48)).astype(np.int8)
    scale = round16(rng.uniform(1e-3, 1e-2, 48))
    event_scale = np.float16(0.0123)
    tile = LinearTile("t", 2, 11, n0, n1, weight_base=40, int8=True, event_scale=int(event_scale.view(np.uint16)))
    x = rng.integers(-127, 128, (4, 12)).astype(np.int8)
    x[np.abs(x) < 60] = 0
    out, counts, events, captured = run_tile(tile, q[2:11, n0:n1], x[:, 2:11], registers, scale=scale[n0:n1],
                                             event_scale=np.float32(event_scale))
    total = collections.Counter()
    for t in range(len(x)):
        step = [Event.int8(c, x[t, c]) for c in range(tile.k0, tile.k1) if x[t, c] != 0]
        core = simulate(tile, q, step, registers, scale)
        got = np.zeros(n1 - n0, F16)
        for e in core.sent[0][1]:
            got[e.channel - n0] = e.value
        want = (x[t, 2:11].astype(np.int32) @ q[2:11, n0:n1].astype(np.int32)).astype(np.float32) * scale[n0:n1] \
            * np.float32(event_scale)
        np.testing.assert_array_equal(got, want.astype(F16))
        np.testing.assert_array_equal(out[t].astype(F16), got)
        assert core.counts["MAC8"] == core.counts["MLD"] - 2 * tile.groups == len(step) * tile.groups
        total += core.counts
    assert counts == total and captured == int(np.count_nonzero(out))


@pytest.mark.parametrize("registers", [64, 12])
def test_int8_weights_with_float_events_match_the_interpreter(registers):
    """int8 weights, 16-bit events: the handler unpacks each byte to a float x 256 and MACs it;
    the vectorised tile is within one 16-bit step, with the same counts (1 MLD per 16 neurons)."""
    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (12, 40)).astype(np.int8)
    scale = round16(rng.uniform(1e-3, 1e-2, 40))
    quarter = np.float16(1 / 256)
    tile = LinearTile("t", 1, 12, 3, 37, weight_base=16, int8=True, float_events=True,
                      event_scale=int(quarter.view(np.uint16)))
    x = rng.standard_normal((4, 12)).astype(F16)
    x[np.abs(x) < 0.6] = 0
    out, counts, events, captured = run_tile(tile, q[1:12, 3:37], x[:, 1:12], registers, scale=scale[3:37],
                                             event_scale=np.float32(quarter))
    total = collections.Counter()
    for t in range(len(x)):
        step = [Event(c, x[t, c]) for c in range(tile.k0, tile.k1) if x[t, c] != 0]
        core = simulate(tile, q, step, registers, scale)
        got = np.zeros(tile.n1 - tile.n0, F16)
        for e in core.sent[0][1]:
            got[e.channel - tile.n0] = e.value
        want = (x[t, 1:12].astype(np.float32) @ q[1:12, 3:37].astype(np.float32)) * scale[3:37]
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=1e-6)
        np.testing.assert_array_max_ulp(out[t].astype(F16), got, maxulp=1)
        assert core.counts["MLD"] == len(step) * tile.groups + 2 * tile.groups and core.counts["MAC8"] == 0
        total += core.counts
    assert counts == total and captured == int(np.count_nonzero(out))


def _own_counts(tile, registers):
    """(no event, per event) counts of the tile's own program, every immediate as written, on the interpreter."""
    program = assemble(linear_handler(tile, registers))
    runs = []
    for events in ([], [Event(tile.k0, np.float16(0))]):
        core = Core(memory_words=tile.buffer_base + tile.buffer_words + 8, registers=registers)
        core.inbox.extend(events)
        run(core, program)
        runs.append(core.counts)
    return runs[0], runs[1] - runs[0]


@pytest.mark.parametrize("registers", [64, 12])
@pytest.mark.parametrize("kind", [{}, {"int8": True}, {"int8": True, "float_events": True}])
def test_step_counts_are_measured_once_per_handler_shape(registers, kind):
    """Tiles of one width and kind share their measured counts: each equals what its own
    program executes on the interpreter, whatever its name, rows, addresses, route and scale."""
    tiles = [LinearTile("a", 0, 16, 0, 37, weight_base=0, **kind),
             LinearTile("other", 300, 301, 100, 137, weight_base=4000, route=3, event_scale=0x1C00 if kind else 0, **kind)]
    for tile in tiles:
        assert step_counts(tile, registers) == _own_counts(tile, registers)
    assert LinearTile("w", 0, 16, 0, 60, 0, **kind).groups > tiles[0].groups   # a wider tile is another shape
    assert step_counts(LinearTile("w", 0, 16, 0, 60, 0, **kind), registers)[0] != step_counts(tiles[0], registers)[0]


def test_round16_equals_numpys_conversion_bit_for_bit():
    """The vectorised rounding (ONNX Runtime's Cast pair) against NumPy's float16 conversion on
    every float32 around the 16-bit subnormal, normal and overflow edges, and random bits."""
    edges = [np.arange(lo, lo + 0x40000, dtype=np.uint32) for lo in (0, 0x33000000, 0x387E0000, 0x477E0000, 0x7F7E0000)]
    bits = np.concatenate(edges + [np.random.default_rng(4).integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32)])
    for x in (bits.view(np.float32), -bits.view(np.float32)):
        with np.errstate(over="ignore"):
            want = x.astype(F16).astype(np.float32)
        got = round16(x.reshape(-1, 64)[:, ::2])      # strided, 2-d: as the simulator passes slices
        want = want.reshape(-1, 64)[:, ::2]
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
