"""Target descriptions: the built-in SENECA file carries SENECA.md's numbers with their
provenance, and a broken target file is refused with a line naming the entry."""
from __future__ import annotations

import re

import pytest

from sparsecc import cli
from sparsecc.backends.seneca.target import ENTRIES, builtin, load_target
from sparsecc.errors import SparseccError

# SENECA.md, "Energy per operation (Frontiers 2023, Table 8; pJ per instruction)".
PUBLISHED_PJ = {"add": 1.4, "sub": 1.4, "mul": 1.4, "int8x2": 1.2, "compare": 1.2, "eql_abs": 1.1, "logic": 1.1,
                "shift": 1.2, "i2f": 1.1, "rnd": 1.4, "mld": 3.7, "mld_memory": 2.9, "mst": 3.9, "mst_memory": 3.5, "evc": 0.5, "evc_per_event": 1.1,
                "riscv": 11.6, "riscv_memory_extra": 10.0, "noc_transfer": 2.0}


def test_seneca_has_the_published_table():
    t = load_target("seneca")
    assert t["energy_pj"] == PUBLISHED_PJ
    assert all(t.sources["energy_pj"][k] == "published" for k in PUBLISHED_PJ)
    assert t["core"]["npes"] == 8 and t["core"]["lanes_int8"] == 2
    assert t["memory_fj_per_bit"]["sram_read"] == 180 and t["memory_fj_per_bit"]["hbm"] == 7000
    # What SENECA.md says is not published must be marked as an assumption.
    for entry in ("clock.frequency_hz", "clock.cycles_per_npe_instruction", "core.data_memory_bytes",
                  "core.instruction_memory_bytes", "core.event_queue_depth", "core.vector_energy", "noc.cycles_per_hop",
                  "noc.energy_per"):
        assert entry in t.assumptions()
    assert t.cores == t["mesh"]["rows"] * t["mesh"]["cols"]


def test_every_builtin_target_is_complete():
    assert "seneca" in builtin()
    for name in builtin():
        t = load_target(name)
        assert {s: set(v) for s, v in t.values.items()} == {s: set(v) for s, v in ENTRIES.items()}


def edit(tmp_path, pattern: str, replacement: str):
    text = builtin()["seneca"].read_text()
    changed = re.sub(pattern, replacement, text, count=1, flags=re.M)
    assert changed != text, pattern
    path = tmp_path / "chip.toml"
    path.write_text(changed)
    return path


@pytest.mark.parametrize("pattern, replacement, mention", [
    (r"^mld = .*$", "", "energy_pj.mld is missing"),
    (r"^mld = \{ value = 3.7", "mld = { value = -3.7", "energy_pj.mld must not be negative"),
    (r"^rows = \{ value = 32", "rows = { value = 0", "mesh.rows must be a whole number"),
    (r"^npes = \{ value = 8", "npes = { value = 2.5", "core.npes must be a whole number"),
    (r"^add = \{ value = 1.4", 'add = { value = "cheap"', "energy_pj.add must be a number"),
    (r'^mul = \{ value = 1.4, source = "published"', 'mul = { value = 1.4, source = "guessed"', "source must be"),
    (r"^sub = .*$", "sub = 1.4", "energy_pj.sub must be a table"),
    (r'^energy_per = \{ value = "hop"', 'energy_per = { value = "wormhole"', "noc.energy_per must be one of"),
    (r"^\[memory_fj_per_bit\]", "[memory_fj_per_bitt]", "section [memory_fj_per_bit] is missing"),
    (r"^hbm = ", "hbm_typo = ", "unknown entry"),
    (r"^schema = .*$", 'schema = "other/9"', "schema must be"),
    (r"^\[mesh\]", "[mesh", "not valid TOML"),
])
def test_broken_target_file_names_the_problem(tmp_path, pattern, replacement, mention):
    path = edit(tmp_path, pattern, replacement)
    with pytest.raises(SparseccError, match=re.escape(mention)):
        load_target(path)


def test_unknown_target_name():
    with pytest.raises(SparseccError, match="unknown target 'loihi'.*seneca"):
        load_target("loihi")


def test_user_target_file_loads(tmp_path):
    path = edit(tmp_path, r"^rows = \{ value = 32", "rows = { value = 4")
    t = load_target(path)
    assert t["mesh"]["rows"] == 4 and t.cores == 4 * t["mesh"]["cols"]


def test_list_targets(capsys):
    assert cli.main(["list", "targets", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seneca") and "1024 cores" in out and "clock.frequency_hz" in out
