"""Energy and cycles come from the target file: check them against SENECA.md's table by hand."""
from __future__ import annotations

import collections
import re

import pytest
from sparsecc.backends.seneca.cost import energy_pj, noc_energy_pj, cycles

from sparsecc.backends.seneca.isa import OPCODES
from sparsecc.backends.seneca.target import builtin, load_target


def test_energy_by_category_by_hand():
    t = load_target("seneca")  # 8 NPEs, energies per NPE
    counts = collections.Counter({"MAC": 10, "MLD": 4, "MST": 2, "EVC": 3, "RECV": 5, "ADDI": 7, "VSET": 2})
    e = energy_pj(counts, events_captured=6, target=t)
    assert e["npe"] == pytest.approx(8 * (10 * (1.4 + 1.4) + 4 * (3.7 - 2.9) + 2 * (3.9 - 3.5) + 3 * 0.5) + 6 * 1.1)
    assert e["memory"] == pytest.approx(8 * (4 * 2.9 + 2 * 3.5) + 5 * 10.0)
    assert e["controller"] == pytest.approx(11.6 * (5 + 7 + 2))
    assert e["noc"] == 0.0
    assert cycles(counts, t) == 10 + 4 + 2 + 3 + 5 + 7 + 2
    assert noc_energy_pj(flits=4, hops=3, target=t) == pytest.approx(2.0 * 4 * 3)


def test_every_instruction_has_a_cost():
    t = load_target("seneca")
    for op in OPCODES:
        e = energy_pj(collections.Counter({op: 1}), 0, t)
        assert sum(e.values()) > 0, op


def test_costs_follow_the_file(tmp_path):
    text = builtin()["seneca"].read_text()
    text = re.sub(r'^vector_energy = \{ value = "per-npe"', 'vector_energy = { value = "per-instruction"', text, flags=re.M)
    text = re.sub(r'^energy_per = \{ value = "hop"', 'energy_per = { value = "transfer"', text, flags=re.M)
    text = re.sub(r"^mul = \{ value = 1.4", "mul = { value = 2.0", text, flags=re.M)
    (tmp_path / "t.toml").write_text(text)
    t = load_target(tmp_path / "t.toml")
    assert energy_pj(collections.Counter({"MAC": 1}), 0, t)["npe"] == pytest.approx(2.0 + 1.4)
    assert noc_energy_pj(flits=4, hops=3, target=t) == pytest.approx(2.0 * 4)
