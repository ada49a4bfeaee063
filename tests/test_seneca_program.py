"""What ships is what is simulated: `simulate` costs the handlers in the folder's program.bin."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import sparsecc
from conftest import llama_model, save
from sparsecc.backends.seneca.isa import OPCODES, decode
from sparsecc.backends.seneca.simulation import simulate
from sparsecc.data import as_feed_source
from sparsecc.errors import SparseccError
from sparsecc.pipeline import default_pipeline


def feeds(n, seed, seq=12, vocab=24):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("program")
    out = tmp / "out"
    sparsecc.compile_model(save(llama_model(), tmp / "model.onnx"), default_pipeline(sparsity=0.5), feeds(4, 0),
                           out=out, target="seneca")
    return out


def _sparse(out):
    return simulate(out, as_feed_source(feeds(2, 1)), compare=False)["sparse"]


def _first(out, kind: str, op: str) -> int:
    """The word index in program.bin of the first `op` in the first handler of `kind` ("linear" or dense)."""
    blob = (out / "program.bin").read_bytes()
    for entries in json.loads((out / "manifest.json").read_text())["cores"].values():
        for e in entries:
            if (e["kind"] == "linear") == (kind == "linear") and e["words"]:
                program = decode(blob[4 * e["offset"]:4 * (e["offset"] + e["words"])])
                ops = [ins.op for ins in program]
                if op in ops:
                    return e["offset"] + ops.index(op)
    raise AssertionError(f"no {op} in a {kind} handler")


def _with_opcode(out, word: int, op: str) -> bytes:
    """program.bin with the opcode of `word` replaced by `op`'s (operand bits kept); returns the original."""
    blob = (out / "program.bin").read_bytes()
    (value,) = struct.unpack_from("<I", blob, 4 * word)
    patched = bytearray(blob)
    struct.pack_into("<I", patched, 4 * word, (value & ((1 << 26) - 1)) | (OPCODES[op][0] << 26))
    (out / "program.bin").write_bytes(bytes(patched))
    return blob


@pytest.mark.parametrize("kind, old, new", [("linear", "MAC", "MUL"), ("dense", "MLD", "ADD")])
def test_an_edited_instruction_changes_what_simulate_counts(folder, kind, old, new):
    before = _sparse(folder)
    word = _first(folder, kind, old)
    original = _with_opcode(folder, word, new)
    try:
        after = _sparse(folder)
    finally:
        (folder / "program.bin").write_bytes(original)
    assert after["instructions"][old] < before["instructions"][old]
    assert after["instructions"][new] > before["instructions"].get(new, 0)
    assert after["energy_pj_per_token"]["total"] != before["energy_pj_per_token"]["total"]
    assert _sparse(folder) == before   # the folder as compiled gives the compiled figures again


def test_a_damaged_image_is_refused_in_one_line(folder, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    (out / "program.bin").write_bytes((folder / "program.bin").read_bytes()[:-8])
    with pytest.raises(SparseccError, match="lies outside program.bin.*re-run") as err:
        _sparse(out)
    assert "\n" not in str(err.value)
    (out / "program.bin").unlink()
    with pytest.raises(SparseccError, match="has no program.bin"):
        _sparse(out)
