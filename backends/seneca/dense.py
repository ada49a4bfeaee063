"""Dense handlers: the programs of every op that is not a linear site, and their exact counts.

A dense handler runs once per token step on the core the partition pass gave its node. It is
a loop nest over 8-lane groups: load the operands that are in data memory (MLD), compute,
store the result (MST) when a later op on the same core reads it from memory, and capture
it as events (EVC) when another core needs it. Operands produced by the op just before on
the same core stay in registers (the two are fused): no load, no store, and no rounding to
16 bit in between, which is also what keeps RMSNorm's sum of squares finite.

Transcendental functions (exp, reciprocal, square root, sine...) are instruction sequences
of the length of a range-reduction plus polynomial/Newton evaluation; the simulator counts
and costs them, and takes their values from NumPy rounded to 16 bit (it does not emulate the
polynomial's own rounding).

Counts: the nests have no data-dependent branches, so the executed counts follow from the
trip counts alone (`Program.counts`); tests check them against the reference interpreter.
"""
from __future__ import annotations

import collections
import dataclasses
import math

from sparsecc.backends.seneca.codegen import ACC_FIRST

# Compute sequences per 8-lane group; operands in r1 (, r2, r3), result in r3, scratch r4-r7,
# constants in r16+.
_EXP = ["MUL r4, r3, r16", "RND r5, r4", "SUB r4, r4, r5"] + ["MUL r6, r6, r4", "ADD r6, r6, r17"] * 4 + \
       ["SHL r5, r5, 10", "ADD r3, r6, r5"]
_RECIP = ["SHR r4, r3, 1", "SUB r4, r18, r4"] + ["MUL r5, r3, r4", "SUB r5, r19, r5", "MUL r4, r4, r5"] * 3 + \
         ["ADD r3, r4, r0"]
_RSQRT = ["SHR r4, r3, 1", "SUB r4, r18, r4"] + ["MUL r5, r4, r4", "MUL r5, r5, r3", "SUB r5, r19, r5",
                                                 "MUL r4, r4, r5"] * 3 + ["ADD r3, r4, r0"]
_SIN = ["MUL r4, r3, r16", "RND r5, r4", "SUB r4, r4, r5", "MUL r5, r4, r4"] + ["MUL r6, r6, r5", "ADD r6, r6, r17"] * 4 + \
       ["MUL r3, r6, r4"]
_LOG = ["SHR r4, r3, 10", "I2F r4, r4", "AND r5, r3, r20", "ORR r5, r5, r21"] + ["MUL r6, r6, r5", "ADD r6, r6, r17"] * 4 + \
       ["MAC r6, r4, r22", "ADD r3, r6, r0"]

COMPUTE: dict[str, list[str]] = {
    "Add": ["ADD r3, r1, r2"], "Sub": ["SUB r3, r1, r2"], "Mul": ["MUL r3, r1, r2"],
    "Max": ["MAX r3, r1, r2"], "Min": ["MIN r3, r1, r2"], "Div": ["ADD r3, r2, r0"] + _RECIP + ["MUL r3, r1, r3"],
    "Neg": ["SUB r3, r0, r1"], "Abs": ["ABS r3, r1"], "Relu": ["MAX r3, r1, r0"],
    "Reciprocal": ["ADD r3, r1, r0"] + _RECIP, "Sqrt": ["ADD r3, r1, r0"] + _RSQRT + ["MUL r3, r3, r1"],
    "Exp": ["ADD r3, r1, r0"] + _EXP, "Log": ["ADD r3, r1, r0"] + _LOG,
    "Sigmoid": ["SUB r3, r0, r1"] + _EXP + ["ADD r3, r3, r19"] + _RECIP,
    "Tanh": ["ADD r3, r1, r1"] + _EXP + ["ADD r3, r3, r19"] + _RECIP + ["ADD r3, r3, r3", "SUB r3, r19, r3"],
    "Erf": ["ADD r3, r1, r0"] + _EXP + ["MUL r3, r3, r1"], "Cos": ["ADD r3, r1, r0"] + _SIN, "Sin": ["ADD r3, r1, r0"] + _SIN,
    "Softplus": ["ADD r3, r1, r0"] + _EXP + ["ADD r3, r3, r19"] + _LOG,
    "Where": ["SUB r4, r2, r3", "MAC r3, r1, r4"], "Equal": ["EQL r3, r1, r2"], "Greater": ["GTH r3, r1, r2"],
    "Less": ["GTH r3, r2, r1"], "GreaterOrEqual": ["GTH r3, r2, r1", "SUB r3, r19, r3"],
    "LessOrEqual": ["GTH r3, r1, r2", "SUB r3, r19, r3"], "Not": ["SUB r3, r19, r1"], "And": ["AND r3, r1, r2"],
    "Or": ["ORR r3, r1, r2"], "IsNaN": ["EQL r3, r1, r1"], "IsInf": ["ABS r3, r1", "EQL r3, r3, r20"],
    # t in r2: held for a scalar t, loaded per group (MLD) for a weight-aware threshold's per-channel t
    "Threshold": ["ABS r4, r1", "GTH r4, r4, r2", "MUL r3, r1, r4"],
    # x / scale with the reciprocal held in r2; int8 words as 16-bit integers (zero point 0 assumed in the cost)
    "QuantizeLinear": ["MUL r3, r1, r2", "F2I r3, r3"], "DequantizeLinear": ["I2F r3, r1", "MUL r3, r3, r2"],
}
COMPUTE["Pow"] = ["MUL r3, r1, r1"]                       # x^2 (RMSNorm); other exponents: exp(y log x)
POW_GENERAL = ["ADD r3, r1, r0"] + _LOG + ["MUL r3, r3, r2"] + _EXP
REDUCE = {"ReduceMean": "ADD", "ReduceSum": "ADD", "ReduceMax": "MAX", "ReduceMin": "MIN"}
# Across the 8 lanes of a register: three halving steps through data memory.
_HORIZONTAL = lambda op: ["MST r3, [x9+0]", "MLD r4, [x9+4]", f"{op} r3, r3, r4",  # noqa: E731
                          "MST r3, [x9+0]", "MLD r4, [x9+2]", f"{op} r3, r3, r4",
                          "MST r3, [x9+0]", "MLD r4, [x9+1]", f"{op} r3, r3, r4"]
# Ops that only rename data in memory: no instructions.
VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Cast", "Dropout", "CastLike"}
# Ops that move data: a load and a store per group.
COPIES = {"Transpose", "Concat", "Slice", "Expand", "Gather", "GatherND", "GatherElements", "Split", "Pad", "Tile",
          "ScatterND", "Trilu", "CumSum", "Range", "ConstantOfShape"}
NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
FUSIBLE = set(COMPUTE) | set(REDUCE) | {"Pow"}


def supported(op_type: str) -> bool:
    return op_type in FUSIBLE or op_type in VIEWS or op_type in COPIES or op_type in NORMS or op_type in ("Softmax", "MatMul")


@dataclasses.dataclass
class Program:
    """Assembly lines of a loop nest and the instructions it executes, counted from its trip counts."""

    lines: list[str] = dataclasses.field(default_factory=list)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    trips: list[int] = dataclasses.field(default_factory=list)   # of its LOOPs, in program order

    def add(self, *instructions: str) -> Program:
        for ins in instructions:
            self.lines.append(f"    {ins}")
            self.counts[ins.split()[0]] += 1
        return self

    def loop(self, trips: int, body: Program, depth: int) -> Program:
        """`body` repeated `trips` times (LI + LOOP on controller register x(10+depth))."""
        if trips <= 0 or not body.lines:
            return self
        self.add(f"LI x{10 + depth}, {trips}", f"LOOP x{10 + depth}, {len(body.lines)}")
        self.lines += body.lines
        self.trips += [trips, *body.trips]
        for op, n in body.counts.items():
            self.counts[op] += trips * n
        return self

    def extend(self, other: Program) -> Program:
        """`other`'s instructions after these."""
        self.lines += other.lines
        self.counts.update(other.counts)
        self.trips += other.trips
        return self

    def text(self, title: str) -> str:
        return f"; {title}\n" + "\n".join(self.lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Operand:
    in_memory: bool      # loaded with MLD per group (else in a register: fused with its producer, or a constant)
    pointer: int         # controller register holding its address


def _stream(program: Program, operands: list[Operand], store: bool, send: bool) -> Program:
    """Pointer increments of one group of an element-wise stream."""
    for op in operands:
        if op.in_memory:
            program.add(f"ADDI x{op.pointer}, x{op.pointer}, 8")
    if store or send:
        program.add("ADDI x8, x8, 8")
    return program


def _result(program: Program, store: bool, send: bool) -> Program:
    if store:
        program.add("MST r3, [x8+0]")
    if send:
        program.add("EVC r3, x8")
    return program


def elementwise(op_type: str, groups: int, operands: list[Operand], store: bool, send: bool,
                general_pow: bool = False) -> Program:
    """`groups` 8-lane groups of an element-wise op (broadcast operands are loaded per group too)."""
    body = Program()
    for i, op in enumerate(operands):
        if op.in_memory:
            body.add(f"MLD r{i + 1}, [x{op.pointer}+0]")
    body.add(*(POW_GENERAL if general_pow else COMPUTE[op_type]))
    _result(body, store, send)
    _stream(body, operands, store, send)
    return Program().loop(groups, body, 0)


def reduce(op_type: str, rows: int, groups: int, operand: Operand, store: bool, send: bool) -> Program:
    """Per row: combine its `groups` groups lane-wise, then across lanes (x 1/n for a mean)."""
    op = REDUCE[op_type]
    inner = Program()
    if operand.in_memory:
        inner.add(f"MLD r1, [x{operand.pointer}+0]", f"ADDI x{operand.pointer}, x{operand.pointer}, 8")
    inner.add(f"{op} r3, r3, r1")
    row = Program().add("SUB r3, r3, r3").loop(groups, inner, 1).add(*_HORIZONTAL(op))
    if op_type == "ReduceMean":
        row.add("MUL r3, r3, r16")
    _result(row, store, send)
    if store or send:
        row.add("ADDI x8, x8, 1")
    return Program().loop(rows, row, 0)


def softmax(rows: int, groups: int, operand: Operand, store: bool, send: bool) -> Program:
    """Per row: max, then exp(x - max) and its sum, then x 1/sum: three passes over the row."""
    ptr = operand.pointer
    load = [f"MLD r1, [x{ptr}+0]", f"ADDI x{ptr}, x{ptr}, 8"] if operand.in_memory else []
    find_max = Program().add(*load, "MAX r3, r3, r1")
    exp_sum = Program().add(*load, "SUB r3, r1, r2", *_EXP, "ADD r7, r7, r3", "MST r3, [x9+0]", "ADDI x9, x9, 8")
    scale = Program().add("MLD r3, [x9+0]", "ADDI x9, x9, 8", "MUL r3, r3, r2")
    _result(scale, store, send)
    if store or send:
        scale.add("ADDI x8, x8, 8")
    row = Program().add("SUB r3, r3, r3").loop(groups, find_max, 1).add(*_HORIZONTAL("MAX"), "ADD r2, r3, r0")
    if operand.in_memory:
        row.add(f"ADDI x{ptr}, x{ptr}, {-8 * groups}")
    row.add("SUB r7, r7, r7").loop(groups, exp_sum, 1).add("ADD r3, r7, r0", *_HORIZONTAL("ADD"), *_RECIP, "ADD r2, r3, r0")
    row.add(f"ADDI x9, x9, {-8 * groups}").loop(groups, scale, 1)
    return Program().loop(rows, row, 0)


def layernorm(rows: int, groups: int, operand: Operand, store: bool, send: bool) -> Program:
    """LayerNormalization (and RMSNormalization, which skips the mean) over the last axis: per
    row, sum and sum of squares in one pass, 1/sqrt(var + eps), then scale and shift."""
    ptr = operand.pointer
    load = [f"MLD r1, [x{ptr}+0]", f"ADDI x{ptr}, x{ptr}, 8"] if operand.in_memory else []
    moments = Program().add(*load, "ADD r6, r6, r1", "MAC r7, r1, r1")
    scale = Program().add(*load, "SUB r3, r1, r2", "MUL r3, r3, r5", "MLD r4, [x2+0]", "MUL r3, r3, r4",
                          "MLD r4, [x3+0]", "ADD r3, r3, r4", "ADDI x2, x2, 8", "ADDI x3, x3, 8")
    _result(scale, store, send)
    if store or send:
        scale.add("ADDI x8, x8, 8")
    row = Program().add("SUB r6, r6, r6", "SUB r7, r7, r7").loop(groups, moments, 1)
    row.add("ADD r3, r6, r0", *_HORIZONTAL("ADD"), "MUL r2, r3, r16", "ADD r3, r7, r0", *_HORIZONTAL("ADD"),
            "MUL r3, r3, r16", "MUL r4, r2, r2", "SUB r3, r3, r4", "ADD r3, r3, r17", *_RSQRT, "ADD r5, r3, r0")
    if operand.in_memory:
        row.add(f"ADDI x{ptr}, x{ptr}, {-8 * groups}")
    row.loop(groups, scale, 1)
    return Program().loop(rows, row, 0)


def matmul(batch_rows: int, inner: int, groups: int, store: bool, send: bool, registers: int = 64) -> Program:
    """Activation x activation ([.., M, K] x [.., K, N]): per output row, per k, broadcast a[m, k]
    and MAC it with row k of b, as many groups at a time as there are accumulator registers
    (r8.., as in the linear handler)."""
    block = registers - ACC_FIRST
    blocks = [min(block, groups - g) for g in range(0, groups, block)]
    row = Program()
    for width in blocks:
        per_k = Program().add("LW x4, [x1+0]", "ADDI x1, x1, 1", "VSET r0, x4")
        for g in range(width):
            per_k.add(f"MLD r1, [x2+{8 * g}]", f"MAC r{ACC_FIRST + g}, r1, r0")
        per_k.add(f"ADDI x2, x2, {8 * groups}")
        row.add(*[f"SUB r{ACC_FIRST + g}, r{ACC_FIRST + g}, r{ACC_FIRST + g}" for g in range(width)])
        row.loop(inner, per_k, 1)
        for g in range(width):
            if store:
                row.add(f"MST r{ACC_FIRST + g}, [x8+0]")
            if send:
                row.add(f"EVC r{ACC_FIRST + g}, x8")
            if store or send:
                row.add("ADDI x8, x8, 8")
    return Program().loop(batch_rows, row, 0)


def copy(groups: int, send: bool) -> Program:
    body = Program().add("MLD r3, [x1+0]", "ADDI x1, x1, 8", "MST r3, [x8+0]")
    if send:
        body.add("EVC r3, x8")
    body.add("ADDI x8, x8, 8")
    return Program().loop(groups, body, 0)


def send(groups: int) -> Program:
    """Send a value held in data memory (a resident state) as events: load and capture per group."""
    body = Program().add("MLD r3, [x1+0]", "ADDI x1, x1, 8", "EVC r3, x8", "ADDI x8, x8, 8")
    return Program().loop(groups, body, 0)


def store(groups: int) -> Program:
    """Store a value still in registers (a tile's outputs) into data memory, per group."""
    return Program().loop(groups, Program().add("MST r3, [x8+0]", "ADDI x8, x8, 8"), 0)


def receive(events: int, groups: int) -> Program:
    """Take a step's incoming events into data memory: clear the buffer's `groups` groups, then
    per event write its value at its channel (RECV, SW, JMP), plus the empty-queue RECV."""
    program = Program().add("SUB r3, r3, r3")
    clear = Program().add("MST r3, [x8+0]", "ADDI x8, x8, 8")
    program.loop(groups, clear, 0)
    per_event = Program().add("RECV x3, x4, L_done", "SW x4, [x3+0]", "JMP L_recv")
    program.lines += ["L_recv:", *per_event.lines, "L_done:"]
    for op, n in per_event.counts.items():
        program.counts[op] += events * n
    program.counts["RECV"] += 1     # the RECV that finds the queue empty
    return program


def groups_of(elements: int) -> int:
    return math.ceil(elements / 8)
