"""Reference interpreter of sparsecc's SENECA-style ISA: one core, one instruction at a time.

It defines what every instruction does, exactly, and counts every executed instruction by
mnemonic. Numerics: data memory, events and the NoC carry 16-bit words, usually 16-bit floats;
NPE registers hold 32-bit words (the target's `numerics.register_format`, an assumption: a
16-bit running sum over 1536 inputs would keep little precision): float32 partial results,
or the 32-bit integers MAC8 accumulates. A float is rounded to 16 bit when it is stored (MST)
or leaves as an event (EVC). An integer event carries its int8 value as a 16-bit integer word. It is slow by design; the simulator executes
handlers vectorised and is tested against it.
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from sparsecc.backends.seneca.isa import Instruction
from sparsecc.errors import SparseccError

LANES = 8
F16 = np.float16
F32 = np.float32


@dataclasses.dataclass
class Event:
    channel: int
    value: np.float16   # the event's 16-bit word

    @classmethod
    def int8(cls, channel: int, q: int) -> Event:
        """An integer event: int8 `q` as a 16-bit integer word (MAC8 reads its low byte)."""
        return cls(channel, np.array(q, np.int16).view(F16)[()])


@dataclasses.dataclass
class Core:
    """Architectural state of one core."""

    memory_words: int
    registers: int = 64
    x: list[int] = dataclasses.field(default_factory=lambda: [0] * 32)
    inbox: collections.deque = dataclasses.field(default_factory=collections.deque)
    captured: list[Event] = dataclasses.field(default_factory=list)
    sent: list[tuple[int, list[Event]]] = dataclasses.field(default_factory=list)   # (route, events)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    events_captured: int = 0

    def __post_init__(self):
        self.r = np.zeros((self.registers, LANES), F32)
        self.ri = self.r.view(np.int32)     # the same 32-bit registers read as integers
        self.memory = np.zeros(self.memory_words, np.uint16)

    def load(self, address: int) -> np.ndarray:
        if not 0 <= address <= self.memory_words - LANES:
            raise SparseccError(f"data memory access at word {address} is outside 0..{self.memory_words - 1}")
        return self.memory[address:address + LANES].view(F16).astype(F32)

    def store(self, address: int, lanes: np.ndarray) -> None:
        self.load(address)  # bounds check
        self.memory[address:address + LANES] = lanes.astype(F16).view(np.uint16)


def run(core: Core, program: list[Instruction], max_steps: int = 10_000_000) -> None:
    """Execute `program` from its first instruction until HALT."""
    pc, steps, loops = 0, 0, []   # loops: [start, end, remaining]
    r, x = core.r, core.x
    while True:
        if not 0 <= pc < len(program):
            raise SparseccError(f"program counter {pc} left the program (no HALT)")
        steps += 1
        if steps > max_steps:
            raise SparseccError(f"program ran over {max_steps} instructions")
        ins = program[pc]
        op, a = ins.op, ins.args
        core.counts[op] += 1
        nxt = pc + 1
        if op in ("ADD", "SUB", "MUL", "MAX", "MIN"):
            fn = {"ADD": np.add, "SUB": np.subtract, "MUL": np.multiply, "MAX": np.maximum, "MIN": np.minimum}[op]
            r[a[0]] = fn(r[a[1]], r[a[2]])
        elif op == "MAC":
            r[a[0]] = r[a[0]] + r[a[1]] * r[a[2]]
        elif op in ("GTH", "EQL"):
            mask = r[a[1]] > r[a[2]] if op == "GTH" else r[a[1]] == r[a[2]]
            r[a[0]] = mask.astype(F32)
        elif op == "ABS":
            r[a[0]] = np.abs(r[a[1]])
        elif op in ("AND", "ORR"):  # bit operations act on the 16-bit word
            fn = np.bitwise_and if op == "AND" else np.bitwise_or
            r[a[0]] = _word16(fn(_bits(r[a[1]]), _bits(r[a[2]])))
        elif op in ("SHL", "SHR"):
            bits = _bits(r[a[1]]).astype(np.uint32)
            shifted = bits << a[2] if op == "SHL" else bits >> a[2]
            r[a[0]] = _word16((shifted & 0xFFFF).astype(np.uint16))
        elif op == "I2F":
            r[a[0]] = _bits(r[a[1]]).view(np.int16).astype(F32)
        elif op == "RND":
            r[a[0]] = np.rint(r[a[1]])
        elif op in ("ADD8", "MUL8"):  # two int8 lanes per 16-bit word, wrapping
            lhs, rhs = _bits(r[a[1]]).view(np.int8).astype(np.int16), _bits(r[a[2]]).view(np.int8).astype(np.int16)
            out = lhs + rhs if op == "ADD8" else lhs * rhs
            r[a[0]] = _word16(out.astype(np.int8).view(np.uint16))
        elif op == "MAC8":  # widening: the lo and hi int8 of ra times rb's low-byte int8, into rd and rd+1
            if a[0] + 1 >= core.registers:
                raise SparseccError(f"MAC8 r{a[0]} needs r{a[0] + 1} too; the core has {core.registers} registers")
            pairs = _bits(r[a[1]]).view(np.int8).reshape(LANES, 2).astype(np.int32)
            value = _bits(r[a[2]]).view(np.int8).reshape(LANES, 2)[:, 0].astype(np.int32)
            core.ri[a[0]] += pairs[:, 0] * value
            core.ri[a[0] + 1] += pairs[:, 1] * value
        elif op == "I2FW":
            r[a[0]] = core.ri[a[1]].astype(F32)
        elif op == "F2I":
            r[a[0]] = _word16(np.clip(np.rint(r[a[1]]), -128, 127).astype(np.int16).view(np.uint16))
        elif op == "MLD":
            r[a[0]] = core.load(x[a[1]] + a[2])
        elif op == "MST":
            core.store(x[a[1]] + a[2], r[a[0]])
        elif op == "VSET":
            r[a[0]] = np.array(x[a[1]] & 0xFFFF, np.uint16).view(F16).astype(F32)
        elif op == "EVC":
            values = r[a[0]].astype(F16)
            for lane in np.flatnonzero(values != 0):
                core.captured.append(Event(x[a[1]] + int(lane), values[lane]))
                core.events_captured += 1
        elif op == "LW":
            x[a[0]] = int(core.memory[_word(core, x[a[1]] + a[2])])
        elif op == "SW":
            core.memory[_word(core, x[a[1]] + a[2])] = x[a[0]] & 0xFFFF
        elif op == "LI":
            x[a[0]] = a[1]
        elif op == "ADDI":
            x[a[0]] = x[a[1]] + a[2]
        elif op == "ADDX":
            x[a[0]] = x[a[1]] + x[a[2]]
        elif op == "MULX":
            x[a[0]] = x[a[1]] * x[a[2]]
        elif op == "LOOP":
            if x[a[0]] > 0:
                loops.append([nxt, nxt + a[1], x[a[0]]])
            else:
                nxt = pc + 1 + a[1]
        elif op in ("BEQ", "BNE"):
            if (x[a[0]] == x[a[1]]) == (op == "BEQ"):
                nxt = pc + a[2]
        elif op == "JMP":
            nxt = pc + a[0]
        elif op == "RECV":
            if core.inbox:
                event = core.inbox.popleft()
                x[a[0]], x[a[1]] = event.channel, int(np.array(event.value, F16).view(np.uint16))
            else:
                nxt = pc + a[2]
        elif op == "SEND":
            core.sent.append((a[0], core.captured))
            core.captured = []
        elif op == "SYNC":
            pass
        elif op == "HALT":
            return
        x[0] = 0
        while loops and nxt == loops[-1][1]:  # end of a loop body: repeat, or leave (nested loops may end together)
            loops[-1][2] -= 1
            if loops[-1][2] > 0:
                nxt = loops[-1][0]
                break
            loops.pop()
        pc = nxt


def _bits(lanes: np.ndarray) -> np.ndarray:
    """The 16-bit words of a register's lanes (its values rounded to 16-bit float)."""
    return lanes.astype(F16).view(np.uint16)


def _word16(bits: np.ndarray) -> np.ndarray:
    """Register lanes holding the 16-bit words `bits`."""
    return bits.view(F16).astype(F32)


def _word(core: Core, address: int) -> int:
    if not 0 <= address < core.memory_words:
        raise SparseccError(f"data memory access at word {address} is outside 0..{core.memory_words - 1}")
    return address
