"""sparsecc's SENECA-style instruction set: assembly text <-> instructions <-> 32-bit words.

A core has a RISC-V controller (scalar registers x0..x31, x0 reads 0) and a loop buffer that
issues vector instructions to its 8 NPEs in SIMD (registers r0..r63 per NPE; 32-bit in the
simulator, the target's [numerics] register_format, an assumption).
Vector instructions act on all NPE lanes at once; `MLD`/`MST` move 8 consecutive 16-bit words
(one per lane) between data memory and a register, at the address in a controller register
plus an immediate.

    unit  mnemonic  operands          meaning (per lane for NPE ops)             energy key
    NPE   ADD SUB MUL  rd, ra, rb     rd = ra op rb (16-bit float)               add/sub/mul
    NPE   MAC          rd, ra, rb     rd += ra * rb (costed as MUL + ADD)        mul+add
    NPE   ADD8 MUL8    rd, ra, rb     packed 2 x INT8, wrapping in the 16-bit word  int8x2
    NPE   MAC8         rd, ra, rb     widening dot step: rd += lo int8 of ra x int8 of rb,  int8x2 twice
                                      rd+1 += hi int8 of ra x int8 of rb (32-bit integers)
    NPE   GTH MAX MIN  rd, ra, rb     compare                                    compare
    NPE   EQL          rd, ra, rb     equality mask                              eql_abs
    NPE   AND ORR      rd, ra, rb     bitwise                                    logic
    NPE   ABS          rd, ra         |ra|                                       eql_abs
    NPE   I2F RND      rd, ra         int16 word to float, round                 i2f/rnd
    NPE   I2FW         rd, ra         32-bit integer to float (MAC8 results)     i2f
    NPE   F2I          rd, ra         float to int8 (round half even, saturate) as a 16-bit integer word   rnd
    NPE   SHL SHR      rd, ra, imm    shifts                                     shift
    NPE   MLD          rd, [xa+imm]   load 8 words                               mld
    NPE   MST          rs, [xa+imm]   store 8 words                              mst
    NPE   VSET         rd, xs         broadcast a controller value to all lanes  riscv (assumed)
    NPE   EVC          rs, xs         capture an event per non-zero lane, channel xs+lane   evc (+ per event)
    CTRL  LI           xd, imm        xd = imm (21-bit signed)                   riscv
    CTRL  ADDI         xd, xs, imm    xd = xs + imm (16-bit signed)              riscv
    CTRL  ADDX MULX    xd, xa, xb     scalar add / multiply                      riscv
    CTRL  LW SW        x, [xa+imm]    scalar load / store                        riscv + riscv_memory_extra
    CTRL  LOOP         xs, len        repeat the next len instructions xs times  riscv
    CTRL  BEQ BNE      xa, xb, label  branch                                     riscv
    CTRL  JMP          label          jump                                       riscv
    CTRL  RECV         xc, xv, label  pop an event (channel, value); to label when the queue is empty   riscv + riscv_memory_extra
    CTRL  SEND         imm            send captured events along route imm       riscv (+ noc per flit and hop)
    CTRL  SYNC         imm            end-of-step barrier imm                    riscv
    CTRL  HALT                        stop                                       riscv

Encoding: one 32-bit little-endian word per instruction, opcode in bits 31..26; the operand
layout per format is in FORMATS. Branch targets are encoded as signed offsets in
instructions and printed as labels `L<index>` by the disassembler. Text is case-insensitive,
`;` starts a comment, `name:` defines a label.
"""
from __future__ import annotations

import dataclasses
import re
import struct

from sparsecc.errors import SparseccError

# format -> operand kinds in text order; each kind has a bit width (imm and off are signed)
FORMATS = {
    "R": ("r", "r", "r"),        # rd, ra, rb
    "U": ("r", "r"),             # rd, ra
    "S": ("r", "r", "imm14"),    # rd, ra, imm
    "M": ("r", "mem"),           # r, [xa+imm15]
    "V": ("r", "x"),             # rd / rs, xs
    "I": ("x", "imm21"),         # xd, imm
    "A": ("x", "x", "imm16"),    # xd, xs, imm
    "X": ("x", "x", "x"),        # xd, xa, xb
    "W": ("x", "mem"),           # x, [xa+imm15]
    "L": ("x", "len12"),         # xs, len
    "B": ("x", "x", "off16"),    # xa, xb, label
    "Q": ("x", "x", "off16"),    # xc, xv, label
    "J": ("off26",),             # label
    "N": ("imm16",),             # route / barrier id
    "Z": (),                     # no operands
}
WIDTH = {"r": 6, "x": 5, "imm14": 14, "imm15": 15, "imm16": 16, "imm21": 21, "len12": 12, "off16": 16, "off26": 26}

# mnemonic: (opcode, format, unit)
OPCODES: dict[str, tuple[int, str, str]] = {}
for _i, (_name, _fmt, _unit) in enumerate([
    ("ADD", "R", "npe"), ("SUB", "R", "npe"), ("MUL", "R", "npe"), ("MAC", "R", "npe"),
    ("ADD8", "R", "npe"), ("MUL8", "R", "npe"), ("MAC8", "R", "npe"),
    ("GTH", "R", "npe"), ("MAX", "R", "npe"), ("MIN", "R", "npe"), ("EQL", "R", "npe"),
    ("AND", "R", "npe"), ("ORR", "R", "npe"),
    ("ABS", "U", "npe"), ("I2F", "U", "npe"), ("RND", "U", "npe"),
    ("SHL", "S", "npe"), ("SHR", "S", "npe"),
    ("MLD", "M", "npe"), ("MST", "M", "npe"), ("VSET", "V", "npe"), ("EVC", "V", "npe"),
    ("LI", "I", "ctrl"), ("ADDI", "A", "ctrl"), ("ADDX", "X", "ctrl"), ("MULX", "X", "ctrl"),
    ("LW", "W", "ctrl"), ("SW", "W", "ctrl"), ("LOOP", "L", "ctrl"),
    ("BEQ", "B", "ctrl"), ("BNE", "B", "ctrl"), ("JMP", "J", "ctrl"), ("RECV", "Q", "ctrl"),
    ("SEND", "N", "ctrl"), ("SYNC", "N", "ctrl"), ("HALT", "Z", "ctrl"),
    ("I2FW", "U", "npe"), ("F2I", "U", "npe"),   # added after the first release: opcodes stay stable
], start=1):
    OPCODES[_name] = (_i, _fmt, _unit)
BY_CODE = {code: name for name, (code, _, _) in OPCODES.items()}


@dataclasses.dataclass(frozen=True)
class Instruction:
    op: str
    args: tuple[int, ...]   # registers, immediates; memory operands as (xa, imm); offsets relative

    @property
    def format(self) -> str:
        return OPCODES[self.op][1]

    @property
    def unit(self) -> str:
        return OPCODES[self.op][2]


def operand_kinds(fmt: str) -> list[str]:
    """Operand kinds with memory operands expanded to (x, imm15)."""
    out = []
    for kind in FORMATS[fmt]:
        out += ["x", "imm15"] if kind == "mem" else [kind]
    return out


_SIGNED = {"imm14", "imm15", "imm16", "imm21", "off16", "off26"}


def _check(value: int, kind: str, where: str) -> None:
    bits = WIDTH[kind]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kind in _SIGNED else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise SparseccError(f"{where}: operand {value} out of range [{lo}, {hi}] for {kind}")


def encode(program: list[Instruction]) -> bytes:
    words = []
    for index, ins in enumerate(program):
        code, fmt, _ = OPCODES[ins.op]
        word, shift = code << 26, 26
        for kind, value in zip(operand_kinds(fmt), ins.args, strict=True):
            _check(value, kind, f"instruction {index} ({ins.op})")
            shift -= WIDTH[kind]
            word |= (value & ((1 << WIDTH[kind]) - 1)) << shift
        words.append(word)
    return struct.pack(f"<{len(words)}I", *words)


def decode(blob: bytes) -> list[Instruction]:
    if len(blob) % 4:
        raise SparseccError(f"program image of {len(blob)} bytes is not whole 32-bit words")
    program = []
    for index, word in enumerate(struct.unpack(f"<{len(blob) // 4}I", blob)):
        name = BY_CODE.get(word >> 26)
        if name is None:
            raise SparseccError(f"word {index} (0x{word:08x}) has unknown opcode {word >> 26}")
        args, shift = [], 26
        for kind in operand_kinds(OPCODES[name][1]):
            shift -= WIDTH[kind]
            value = (word >> shift) & ((1 << WIDTH[kind]) - 1)
            if kind in _SIGNED and value >> (WIDTH[kind] - 1):
                value -= 1 << WIDTH[kind]
            args.append(value)
        program.append(Instruction(name, tuple(args)))
    return program


_MEM = re.compile(r"^\[\s*x(\d+)\s*([+-]\s*-?\d+)?\s*\]$", re.I)


def assemble(text: str) -> list[Instruction]:
    """Parse assembly text (labels allowed) into instructions."""
    lines, labels = [], {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(";", 1)[0].strip()
        while (m := re.match(r"^([A-Za-z_.][\w.]*):\s*", line)):
            labels[m.group(1)] = len(lines)
            line = line[m.end():]
        if line:
            lines.append((number, line))
    program = []
    for index, (number, line) in enumerate(lines):
        where = f"line {number}"
        mnemonic, _, rest = line.partition(" ")
        op = mnemonic.upper()
        if op not in OPCODES:
            raise SparseccError(f"{where}: unknown instruction {mnemonic!r}")
        operands = [t for t in _split_operands(rest) if t]
        kinds = FORMATS[OPCODES[op][1]]
        if len(operands) != len(kinds):
            raise SparseccError(f"{where}: {op} takes {len(kinds)} operands, got {len(operands)}")
        args: list[int] = []
        for kind, token in zip(kinds, operands):
            args += _operand(kind, token, labels, index, where)
        program.append(Instruction(op, tuple(args)))
    return program


def _split_operands(rest: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in rest:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return out


def _operand(kind: str, token: str, labels: dict[str, int], index: int, where: str) -> list[int]:
    if kind == "mem":
        m = _MEM.match(token)
        if not m:
            raise SparseccError(f"{where}: expected a memory operand like [x3+16], got {token!r}")
        return [_register("x" + m.group(1), "x", where), int((m.group(2) or "0").replace(" ", ""))]
    if kind in ("r", "x"):
        return [_register(token, kind, where)]
    if kind.startswith("off"):
        if token not in labels:
            raise SparseccError(f"{where}: unknown label {token!r}")
        return [labels[token] - index]
    try:
        return [int(token, 0)]
    except ValueError:
        raise SparseccError(f"{where}: expected a number, got {token!r}") from None


def _register(token: str, kind: str, where: str) -> int:
    m = re.fullmatch(rf"{kind}(\d+)", token.strip(), re.I)
    if not m:
        raise SparseccError(f"{where}: expected a {'vector register r0..r63' if kind == 'r' else 'controller register x0..x31'}, got {token!r}")
    value = int(m.group(1))
    if value >= (64 if kind == "r" else 32):
        raise SparseccError(f"{where}: register {token} does not exist")
    return value


def disassemble(program: list[Instruction]) -> str:
    """Canonical assembly text; branch targets become labels L<index>."""
    targets = set()
    for index, ins in enumerate(program):
        if ins.format in ("B", "Q", "J"):
            targets.add(index + ins.args[-1])
    lines = []
    for index, ins in enumerate(program):
        if index in targets:
            lines.append(f"L{index}:")
        lines.append(f"    {ins.op:<5} {_format_args(ins, index)}".rstrip())
    for extra in sorted(t for t in targets if t >= len(program)):  # a label past the end
        lines.append(f"L{extra}:")
    return "\n".join(lines) + "\n"


def _format_args(ins: Instruction, index: int) -> str:
    out, args = [], list(ins.args)
    for kind in FORMATS[ins.format]:
        if kind == "mem":
            xa, imm = args.pop(0), args.pop(0)
            out.append(f"[x{xa}{imm:+d}]")
        elif kind in ("r", "x"):
            out.append(f"{kind}{args.pop(0)}")
        elif kind.startswith("off"):
            out.append(f"L{index + args.pop(0)}")
        else:
            out.append(str(args.pop(0)))
    return ", ".join(out)
