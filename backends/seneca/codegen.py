"""Code generation for SENECA-style cores: the event handler of a linear tile.

A tile holds rows k0..k1 (input channels) x columns n0..n1 (output neurons) of a linear
site's weight, row-major in data memory, each row padded to whole 8-lane groups. Per
incoming event (channel c, value v) the handler fetches row c's slice and accumulates
v x row into the tile's outputs, 8 neurons per vector instruction; a zero activation sends
no event and costs nothing. At the end of the step it captures an event for every non-zero
output (channel n0 + neuron) and sends them along its route.

Accumulators live in NPE registers when the tile's groups fit, otherwise in data memory
(then each group costs a load and a store per event as well).
"""
from __future__ import annotations

import dataclasses

ACC_FIRST = 8   # r0: broadcast event value, r1-r2: scratch, r8..: accumulators
X_BASE, X_STRIDE, X_CHAN, X_VAL, X_ROW, X_OUT, X_ACC = range(1, 8)  # controller register roles (x0 is zero)


@dataclasses.dataclass(frozen=True)
class LinearTile:
    name: str
    k0: int
    k1: int
    n0: int
    n1: int
    weight_base: int      # word address of row k0
    route: int = 0

    @property
    def groups(self) -> int:
        return -(-(self.n1 - self.n0) // 8)

    @property
    def row_words(self) -> int:
        return 8 * self.groups

    @property
    def acc_base(self) -> int:
        """Word address of the accumulators when they spill to data memory."""
        return self.weight_base + (self.k1 - self.k0) * self.row_words


def linear_handler(tile: LinearTile, registers: int = 64) -> str:
    """Assembly of one step of the tile's event handler."""
    in_registers = tile.groups <= registers - ACC_FIRST
    acc = [f"r{ACC_FIRST + g}" for g in range(tile.groups)] if in_registers else None
    lines = [f"; linear tile {tile.name}: k[{tile.k0}:{tile.k1}] x n[{tile.n0}:{tile.n1}], "
             f"{tile.groups} groups, accumulators in {'registers' if in_registers else 'data memory'}",
             f"    LI    x{X_BASE}, {tile.weight_base}",
             f"    LI    x{X_STRIDE}, {tile.row_words}",
             f"    LI    x{X_ACC}, {tile.acc_base}"]
    for g in range(tile.groups):  # clear the accumulators
        if in_registers:
            lines.append(f"    SUB   {acc[g]}, {acc[g]}, {acc[g]}")
        else:
            lines += (["    SUB   r2, r2, r2"] if g == 0 else []) + [f"    MST   r2, [x{X_ACC}+{8 * g}]"]
    lines += ["event:",
              f"    RECV  x{X_CHAN}, x{X_VAL}, end",
              f"    ADDI  x{X_CHAN}, x{X_CHAN}, {-tile.k0}",
              f"    MULX  x{X_ROW}, x{X_CHAN}, x{X_STRIDE}",
              f"    ADDX  x{X_ROW}, x{X_ROW}, x{X_BASE}",
              f"    VSET  r0, x{X_VAL}"]
    for g in range(tile.groups):
        lines.append(f"    MLD   r1, [x{X_ROW}+{8 * g}]")
        if in_registers:
            lines.append(f"    MAC   {acc[g]}, r1, r0")
        else:
            lines += [f"    MLD   r2, [x{X_ACC}+{8 * g}]", "    MAC   r2, r1, r0", f"    MST   r2, [x{X_ACC}+{8 * g}]"]
    lines += ["    JMP   event", "end:", f"    LI    x{X_OUT}, {tile.n0}"]
    for g in range(tile.groups):
        if not in_registers:
            lines.append(f"    MLD   r2, [x{X_ACC}+{8 * g}]")
        lines += [f"    EVC   {acc[g] if in_registers else 'r2'}, x{X_OUT}", f"    ADDI  x{X_OUT}, x{X_OUT}, 8"]
    lines += [f"    SEND  {tile.route}", "    SYNC  0", "    HALT"]
    return "\n".join(lines) + "\n"
