"""The SENECA-style ISA: assembly text, instructions and 32-bit words round-trip exactly."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.backends.seneca.isa import FORMATS, OPCODES, WIDTH, Instruction, operand_kinds, assemble, decode, disassemble, encode
from sparsecc.errors import SparseccError

SIGNED = {"imm14", "imm15", "imm16", "imm21", "off16", "off26"}


def operand(kind: str, length: int, index: int):
    if kind == "r":
        return st.integers(0, 63)
    if kind == "x":
        return st.integers(0, 31)
    if kind.startswith("off"):  # branch targets stay inside the program (or one past its end)
        return st.integers(-index, length - index)
    bits = WIDTH[kind]
    return st.integers(-(1 << bits - 1), (1 << bits - 1) - 1) if kind in SIGNED else st.integers(0, (1 << bits) - 1)


@st.composite
def programs(draw):
    length = draw(st.integers(1, 40))
    out = []
    for index in range(length):
        op = draw(st.sampled_from(sorted(OPCODES)))
        out.append(Instruction(op, tuple(draw(operand(k, length, index)) for k in operand_kinds(OPCODES[op][1]))))
    return out


@settings(max_examples=300, deadline=None)
@given(programs())
def test_round_trip(program):
    blob = encode(program)
    assert len(blob) == 4 * len(program)
    assert decode(blob) == program
    text = disassemble(program)
    assert assemble(text) == program
    assert disassemble(assemble(text)) == text


def test_every_format_is_used_and_opcodes_are_unique():
    assert {fmt for _, fmt, _ in OPCODES.values()} == set(FORMATS)
    codes = [code for code, _, _ in OPCODES.values()]
    assert len(set(codes)) == len(codes) and max(codes) < 64


def test_golden_encoding():
    program = assemble("top: LI x1, -2\n MLD r5, [x1+12]\n MAC r8, r1, r0\n BNE x1, x0, top\n HALT")
    words = [int.from_bytes(encode([ins]), "little") for ins in program]
    li, mld, mac, bne, halt = (OPCODES[n][0] for n in ("LI", "MLD", "MAC", "BNE", "HALT"))
    assert words == [
        li << 26 | 1 << 21 | (-2 & 0x1FFFFF),
        mld << 26 | 5 << 20 | 1 << 15 | 12,
        mac << 26 | 8 << 20 | 1 << 14 | 0 << 8,
        bne << 26 | 1 << 21 | 0 << 16 | (-3 & 0xFFFF),
        halt << 26,
    ]


@pytest.mark.parametrize("text, mention", [
    ("FOO r1, r2", "unknown instruction 'FOO'"),
    ("ADD r1, r2", "ADD takes 3 operands, got 2"),
    ("ADD r1, r2, x3", "expected a vector register"),
    ("ADD r1, r2, r64", "register r64 does not exist"),
    ("LI x1, 1048576", "out of range"),
    ("MLD r1, x2", "memory operand"),
    ("JMP nowhere", "unknown label 'nowhere'"),
    ("SHL r1, r2, two", "expected a number"),
])
def test_bad_assembly(text, mention):
    with pytest.raises(SparseccError, match=mention):
        encode(assemble(text))


def test_bad_images():
    with pytest.raises(SparseccError, match="not whole 32-bit words"):
        decode(b"\x00\x00\x00")
    with pytest.raises(SparseccError, match="unknown opcode 63"):
        decode((63 << 26).to_bytes(4, "little"))
