"""Same inputs and seed, byte-identical outputs, for every command that writes files:
compile for the ort and the seneca target (model, reports, programs, placement), eval -o,
simulate and export. Wall times live in timings.json, the only file allowed to differ.
Each command runs twice into the same path (paths appear in the reports), the first result
moved aside in between. (tests/test_determinism.py covers compiling from the cache.)"""
from __future__ import annotations

import shutil

from conftest import listing, mlp_feeds, mlp_model, save, save_npz

from sparsecc import cli
from sparsecc.export import export


def _run_all(tmp_path, model, npz, hf) -> None:
    out = tmp_path / "out"
    for target in ("ort", "seneca"):
        assert cli.main(["-q", "compile", str(model), "--calib", str(npz), "--sparsity", "0.4", "--target", target,
                         "-o", str(out / target), "--no-cache"]) == 0
    assert cli.main(["-q", "eval", str(out / "ort" / "model.onnx"), "--ppl", str(npz), "-o", str(out / "eval")]) == 0
    assert cli.main(["-q", "simulate", str(out / "seneca"), "--text", str(npz), "--windows", "2",
                     "-o", str(out / "simulation")]) == 0
    export(hf, out / "export", check_tokens=3)


def test_every_command_writes_the_same_bytes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))   # torch's, kept out of TMPDIR
    from test_step_graphs import tiny

    model = save(mlp_model(), tmp_path / "in" / "mlp.onnx")
    npz = save_npz(mlp_feeds(3, rows=8), tmp_path / "in" / "feeds.npz")
    hf = tmp_path / "in" / "mamba"
    tiny("mamba").save_pretrained(hf)
    runs = []
    for i in range(2):
        _run_all(tmp_path, model, npz, hf)
        runs.append(shutil.move(tmp_path / "out", tmp_path / f"run{i}"))
    first, second = (listing(run) for run in runs)
    assert first.keys() == second.keys()
    timings = {name for name in first if name.endswith("timings.json")}
    assert timings == {"ort/timings.json", "seneca/timings.json", "simulation/timings.json"}
    differing = sorted(name for name in first if name not in timings and first[name] != second[name])
    assert differing == []
    # every kind of output is in the comparison
    for name in ("ort/model.onnx", "ort/report.json", "ort/config.yaml", "seneca/program.bin", "seneca/placement.json",
                 "seneca/manifest.json", "seneca/cores/core_0000.s", "eval/report.json", "eval/report.md",
                 "simulation/report.json", "simulation/report.md", "export/model.onnx", "export/report.json"):
        assert first.get(name), name
