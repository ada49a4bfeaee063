"""Code generation for SENECA-style cores: the event handler of a linear tile.

A tile holds rows k0..k1 (input channels) x columns n0..n1 (output neurons) of a linear
site's weight, row-major in data memory, each row padded to whole 8-lane groups. Per
incoming event (channel c, value v) the handler fetches row c's slice and accumulates
v x row into the tile's outputs, 8 neurons per vector instruction; a zero activation sends
no event and costs nothing. At the end of the step it captures an event for every non-zero
output (channel n0 + neuron) and sends them along its route.

Accumulators live in NPE registers (32-bit partial sums). When the tile has more groups than
registers, the handler first buffers the step's events in data memory (channel, value: two
words each) and then replays the buffer once per block of groups that fits the registers.

An integer tile (int8 weights, int8 events) packs two weights per 16-bit word: a group is 16
neurons, lane j of the NPE array holds neurons j (low byte) and j + 8 (high byte), and one
MAC8 adds both products to two 32-bit integer accumulators. At the end of the step each
accumulator becomes a float (I2FW) and is multiplied by its neuron's 16-bit weight scale
(stored after the rows), then by the activation scale (held in r2 for the step) before it is
captured. Two multiplies, because the product of the scales (~1e-6) would be a subnormal
16-bit float with few significant bits.

With int8 weights and 16-bit float events (`float_events`) the packed weights still halve the
memory and the loads; each byte is moved to the high half of a 16-bit integer (SHL 8 or AND
0xFF00), converted (I2F, so x 256) and MACed in float; r2 then holds 1/256.
"""
from __future__ import annotations

import dataclasses

ACC_FIRST = 8   # r0: broadcast event value, r1-r2: scratch, r8..: accumulators
X_BASE, X_STRIDE, X_CHAN, X_VAL, X_ROW, X_OUT, X_BUF, X_COUNT, X_FIRST, X_SCALE = range(1, 11)  # controller registers (x0 is zero)


@dataclasses.dataclass(frozen=True)
class LinearTile:
    name: str
    k0: int
    k1: int
    n0: int
    n1: int
    weight_base: int      # word address of row k0
    route: int = 0
    int8: bool = False    # int8 weights, packed two per word (else 16-bit floats)
    float_events: bool = False   # with int8 weights: 16-bit float events, weights unpacked to floats (else MAC8)
    event_scale: int = 0  # int8 weights: the 16-bit float word of the second factor at capture

    @property
    def group_size(self) -> int:
        """Neurons per vector instruction: 8 NPEs, two int8 lanes each for an integer tile."""
        return 16 if self.int8 else 8

    @property
    def groups(self) -> int:
        return -(-(self.n1 - self.n0) // self.group_size)

    @property
    def row_words(self) -> int:
        return 8 * self.groups

    @property
    def scale_base(self) -> int:
        """Word address of the per-neuron 16-bit scales (integer tiles)."""
        return self.weight_base + (self.k1 - self.k0) * self.row_words

    @property
    def buffer_base(self) -> int:
        """Word address of the event buffer (used when the groups take several register blocks)."""
        return self.scale_base + (16 * self.groups if self.int8 else 0)

    @property
    def buffer_words(self) -> int:
        return 2 * (self.k1 - self.k0)


def linear_handler(tile: LinearTile, registers: int = 64) -> str:
    """Assembly of one step of the tile's event handler."""
    per_group = 2 if tile.int8 else 1     # accumulators per group
    block = (registers - ACC_FIRST) // per_group
    blocks = [range(g, min(g + block, tile.groups)) for g in range(0, tile.groups, block)]
    lines = [f"; linear tile {tile.name}: k[{tile.k0}:{tile.k1}] x n[{tile.n0}:{tile.n1}], "
             f"{tile.groups} groups in {len(blocks)} register block{'s' if len(blocks) > 1 else ''}",
             f"    LI    x{X_BASE}, {tile.weight_base}",
             f"    LI    x{X_STRIDE}, {tile.row_words}",
             f"    LI    x{X_FIRST}, {-tile.k0}"]
    if tile.int8:
        lines += [f"    LI    x{X_SCALE}, {tile.scale_base}", f"    LI    x{X_OUT}, {tile.event_scale}", f"    VSET  r2, x{X_OUT}"]
    if tile.float_events:   # r5: the high-byte mask
        lines += [f"    LI    x{X_OUT}, {0xFF00}", f"    VSET  r5, x{X_OUT}"]

    def clear(groups):
        return [f"    SUB   r{ACC_FIRST + i}, r{ACC_FIRST + i}, r{ACC_FIRST + i}" for i in range(per_group * len(groups))]

    def accumulate(groups):  # the event (x_chan, x_val) into the block's accumulators
        out = [f"    ADDX  x{X_CHAN}, x{X_CHAN}, x{X_FIRST}",
               f"    MULX  x{X_ROW}, x{X_CHAN}, x{X_STRIDE}",
               f"    ADDX  x{X_ROW}, x{X_ROW}, x{X_BASE}",
               f"    VSET  r0, x{X_VAL}"]
        for i, g in enumerate(groups):
            acc = ACC_FIRST + per_group * i
            out.append(f"    MLD   r1, [x{X_ROW}+{8 * g}]")
            if tile.float_events:   # each int8 to a float x 256 (its byte in the high half of an int16)
                out += ["    SHL   r3, r1, 8", "    I2F   r3, r3", f"    MAC   r{acc}, r3, r0",
                        "    AND   r4, r1, r5", "    I2F   r4, r4", f"    MAC   r{acc + 1}, r4, r0"]
            else:
                out.append(f"    {'MAC8' if tile.int8 else 'MAC':<5} r{acc}, r1, r0")
        return out

    def capture(groups):
        out = [f"    LI    x{X_OUT}, {tile.n0 + tile.group_size * groups[0]}"]
        for i, g in enumerate(groups):
            for lane in range(per_group):   # integer tile: to float, times the neurons' scales
                acc = f"r{ACC_FIRST + per_group * i + lane}"
                if tile.int8:
                    out += ([] if tile.float_events else [f"    I2FW  {acc}, {acc}"]) + [
                        f"    MLD   r1, [x{X_SCALE}+{16 * g + 8 * lane}]", f"    MUL   {acc}, {acc}, r1", f"    MUL   {acc}, {acc}, r2"]
                out += [f"    EVC   {acc}, x{X_OUT}", f"    ADDI  x{X_OUT}, x{X_OUT}, 8"]
        return out

    if len(blocks) == 1:
        lines += clear(blocks[0]) + ["event:", f"    RECV  x{X_CHAN}, x{X_VAL}, end"] + accumulate(blocks[0])
        lines += ["    JMP   event", "end:"] + capture(blocks[0])
    else:
        lines += [f"    LI    x{X_BUF}, {tile.buffer_base}", f"    LI    x{X_COUNT}, 0",
                  "event:", f"    RECV  x{X_CHAN}, x{X_VAL}, replay",
                  f"    SW    x{X_CHAN}, [x{X_BUF}+0]", f"    SW    x{X_VAL}, [x{X_BUF}+1]",
                  f"    ADDI  x{X_BUF}, x{X_BUF}, 2", f"    ADDI  x{X_COUNT}, x{X_COUNT}, 1",
                  "    JMP   event", "replay:"]
        for groups in blocks:
            replay = [f"    LW    x{X_CHAN}, [x{X_BUF}+0]", f"    LW    x{X_VAL}, [x{X_BUF}+1]",
                      f"    ADDI  x{X_BUF}, x{X_BUF}, 2"] + accumulate(groups)
            lines += clear(groups) + [f"    LI    x{X_BUF}, {tile.buffer_base}", f"    LOOP  x{X_COUNT}, {len(replay)}"]
            lines += replay + capture(groups)
    lines += [f"    SEND  {tile.route}", "    SYNC  0", "    HALT"]
    return "\n".join(lines) + "\n"
