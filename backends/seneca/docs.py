"""The generated sections of docs/seneca.md (`python -m sparsecc.docgen` fills them): the
instruction set's reference (the ISA module's docstring), the instruction table with the energy
entries the cost model charges, and every entry of the built-in target file."""
from __future__ import annotations

import tomllib

from sparsecc.backends.seneca import cost, isa
from sparsecc.backends.seneca.target import ENTRIES, builtin
from sparsecc.docgen import _cell


def isa_doc() -> str:
    return "```\n" + isa.__doc__.strip("\n") + "\n```"


def isa_table() -> str:
    FORMATS, OPCODES, WIDTH = isa.FORMATS, isa.OPCODES, isa.WIDTH
    lines = ["| opcode | mnemonic | unit | format | operands (bits) | energy entries |", "|---|---|---|---|---|---|"]
    for name, (code, fmt, unit) in sorted(OPCODES.items(), key=lambda kv: kv[1][0]):
        operands = ", ".join("[x(5)+imm(15)]" if k == "mem" else f"{k.rstrip('0123456789')}({WIDTH[k]})"
                             for k in FORMATS[fmt]) or "-"
        if unit == "npe" and name not in cost._TO_CONTROLLER:
            energy = " + ".join(cost._NPE[name]) + " (x NPEs)"
        else:
            energy = "riscv" + (" + riscv_memory_extra" if name in cost._CONTROLLER_MEMORY else "")
        if name == "EVC":
            energy += "; + evc_per_event per event"
        if name == "SEND":
            energy += "; + noc_transfer per flit (x hops)"
        lines.append(f"| {code} | `{name}` | {unit} | {fmt} | {operands} | {energy} |")
    return "\n".join(lines)


def energy_table() -> str:
    doc = tomllib.loads(builtin()["seneca"].read_text(encoding="utf-8"))
    lines = ["| entry | value | source | note |", "|---|---|---|---|"]
    for section, entries in ENTRIES.items():
        for key in entries:
            e = doc[section][key]
            lines.append(f"| `{section}.{key}` | {e['value']} | {e['source']} | {_cell(e.get('note', ''))} |")
    return "\n".join(lines)


SECTIONS = {"isa-doc": isa_doc, "isa-table": isa_table, "energy-table": energy_table}
