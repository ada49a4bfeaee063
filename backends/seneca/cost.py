"""Energy and cycles of executed instructions, from the target file alone.

Categories follow the issue's breakdown: `npe` (vector compute on the NPEs, event capture),
`memory` (data-memory share of MLD/MST and of controller loads/stores), `controller`
(RISC-V instructions) and `noc` (event flits on the network). Nothing here is a constant of
its own: every number comes from the target description.
"""
from __future__ import annotations

import collections

from sparsecc.backends.seneca.isa import OPCODES
from sparsecc.backends.seneca.target import Target

CATEGORIES = ("npe", "memory", "controller", "noc")
# NPE mnemonic -> energy_pj entries it costs (MAC is costed as MUL + ADD, MAC8 as two INT8 ops)
_NPE = {"ADD": ("add",), "SUB": ("sub",), "MUL": ("mul",), "MAC": ("mul", "add"), "ADD8": ("int8x2",),
        "MUL8": ("int8x2",), "MAC8": ("int8x2", "int8x2"), "GTH": ("compare",), "MAX": ("compare",),
        "MIN": ("compare",), "EQL": ("eql_abs",), "ABS": ("eql_abs",), "AND": ("logic",), "ORR": ("logic",),
        "SHL": ("shift",), "SHR": ("shift",), "I2F": ("i2f",), "I2FW": ("i2f",), "F2I": ("rnd",), "RND": ("rnd",), "MLD": ("mld",), "MST": ("mst",),
        "EVC": ("evc",)}
_CONTROLLER_MEMORY = {"LW", "SW", "RECV"}  # controller instructions that touch data memory
_TO_CONTROLLER = {"VSET"}                  # a broadcast from the controller: costed as a RISC-V instruction


def energy_pj(counts: collections.Counter, events_captured: int, target: Target) -> dict[str, float]:
    """Energy by category of `counts` executed instructions on one core (NoC excluded)."""
    e, lanes = target["energy_pj"], target["core"]["npes"] if target["core"]["vector_energy"] == "per-npe" else 1
    out = dict.fromkeys(CATEGORIES, 0.0)
    for op, n in counts.items():
        if OPCODES[op][2] == "npe" and op not in _TO_CONTROLLER:
            total = sum(e[key] for key in _NPE[op]) * lanes * n
            memory = {"MLD": e["mld_memory"], "MST": e["mst_memory"]}.get(op, 0.0) * lanes * n
            out["memory"] += memory
            out["npe"] += total - memory
        else:
            out["controller"] += e["riscv"] * n
            if op in _CONTROLLER_MEMORY:
                out["memory"] += e["riscv_memory_extra"] * n
    out["npe"] += e["evc_per_event"] * events_captured
    return out


def noc_energy_pj(flits: int, hops: int, target: Target) -> float:
    """Energy of `flits` 32-bit flits travelling `hops` links (or once, if priced per transfer)."""
    per = hops if target["noc"]["energy_per"] == "hop" else 1
    return target["energy_pj"]["noc_transfer"] * flits * per


def cycles(counts: collections.Counter, target: Target) -> float:
    clock = target["clock"]
    return sum(n * (clock["cycles_per_npe_instruction"] if OPCODES[op][2] == "npe" and op not in _TO_CONTROLLER
                    else clock["cycles_per_riscv_instruction"]) for op, n in counts.items())
