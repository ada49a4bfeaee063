"""Output folders are replaced atomically: an interrupted run leaves nothing behind and an
earlier output untouched; a successful one replaces an earlier output completely."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import listing
from sparsecc.passes.calibrate_thresholds import CalibrateThresholds
from sparsecc.passes.insert_thresholds import InsertThresholds

import sparsecc
from sparsecc import calibration, cli, model_io, report


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _compile(model, npz, out, *extra):
    return cli.main(["compile", str(model), "--calib", str(npz), "-o", str(out), "--no-cache", *extra])


@pytest.mark.parametrize("where", ["insert-thresholds", "calibration", "saving"])
def test_interrupt_writes_nothing(where, mlp_path, mlp_npz, tmp_path, monkeypatch, capsys):
    target = {"insert-thresholds": (InsertThresholds, "run"), "calibration": (calibration, "bin_counts"),
              "saving": (model_io, "save_model")}[where]
    monkeypatch.setattr(*target, _interrupt)
    work = tmp_path / "work"
    work.mkdir()
    assert _compile(mlp_path, mlp_npz, work / "out") == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(work.iterdir()) == []   # no output, no temporary folder
    # (the autouse fixture also checks that ONNX Runtime's temporary model copies are gone)


@pytest.mark.parametrize("where", ["calibrate-thresholds", "report"])
def test_interrupt_keeps_the_previous_output(where, mlp_path, mlp_npz, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    out = work / "out"
    assert _compile(mlp_path, mlp_npz, out, "--sparsity", "0.3") == 0
    before = listing(work)
    if where == "report":   # fails inside the temporary folder, after model.onnx is written
        monkeypatch.setattr(report, "compile_markdown", _interrupt)
    else:
        monkeypatch.setattr(CalibrateThresholds, "run", _interrupt)
    assert _compile(mlp_path, mlp_npz, out, "--sparsity", "0.7") == 130
    assert listing(work) == before


def test_interrupt_through_the_python_api(mlp_path, tmp_path, monkeypatch):
    from conftest import mlp_feeds

    monkeypatch.setattr(CalibrateThresholds, "run", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(), mlp_feeds(2), out=tmp_path / "work" / "out")
    assert not (tmp_path / "work").exists()


def test_previous_output_is_replaced_cleanly(mlp_path, mlp_npz, tmp_path, capsys):
    work = tmp_path / "work"
    out = work / "out"
    assert _compile(mlp_path, mlp_npz, out, "--sparsity", "0.3") == 0
    (out / "stale-extra-file.txt").write_text("from an older run")
    old_model = (out / "model.onnx").read_bytes()
    assert _compile(mlp_path, mlp_npz, out, "--sparsity", "0.7") == 0
    assert sorted(p.name for p in work.iterdir()) == ["out"]   # no .out.tmp-* / .out.old-* left
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.onnx", "report.html", "report.json",
                                                     "report.md", "timings.json"]
    assert json.loads((out / "report.json").read_text())["passes"][2]["details"]["target"] == 0.7
    assert (out / "model.onnx").read_bytes() != old_model
    # An existing empty folder may be used as well.
    empty = work / "empty"
    empty.mkdir()
    assert _compile(mlp_path, mlp_npz, empty) == 0
    assert (empty / "model.onnx").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["empty", "out"]


def test_atomic_dir_directly(tmp_path):
    work = tmp_path / "work"
    out = work / "o"
    with pytest.raises(RuntimeError), model_io.atomic_dir(out) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("boom")
    assert list(work.iterdir()) == []
    with model_io.atomic_dir(out) as tmp:
        (tmp / "report.json").write_text("{}")
        assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == ["o"]
    assert (out / "report.json").read_text() == "{}"
    # The output is an ordinary folder (permissions from the umask), not a private temporary one.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_real_signal_during_calibration_leaves_nothing(sig, tmp_path):
    """A real signal to the `sparsecc` process while it calibrates: exit 130/143, no output,
    no temporary model copy left in TMPDIR."""
    import signal
    import subprocess
    import sys

    from conftest import SAMPLE, SAMPLE_MODEL, VALID_TXT

    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsecc.cli", "compile", str(SAMPLE_MODEL), "--calib", str(VALID_TXT),
         "--tokenizer", str(SAMPLE), "-o", str(work / "out"), "--no-cache", "--refine", "20", "--seq-len", "64"],
        stderr=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(scratch)})
    for line in proc.stderr:  # wait until calibration is under way
        if "calibrate-thresholds" in line:
            break
    proc.send_signal(getattr(signal, sig))
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + getattr(signal, sig), err
    assert list(work.iterdir()) == []
    assert list(scratch.iterdir()) == []


def test_concurrent_collections_of_one_cache_entry_measure_it_once(mlp_path, mlp_npz, tmp_path, monkeypatch):
    """Two collections of the same statistics at once (as two sweep cells with the same model and
    data): the first measures while holding the entry's lock (slowed here, so the second surely
    arrives meanwhile), the second waits, then reads the file the first wrote. Without the lock
    both would find no file and measure."""
    import threading
    import time

    from sparsecc import compiler

    measure = calibration._measure
    monkeypatch.setattr(calibration, "_measure", lambda *a: (time.sleep(0.5), measure(*a))[1])
    waited = []
    monkeypatch.setattr(calibration, "log", lambda message, level=1: waited.append(message) if "waiting" in message else None)
    model = model_io.load_model(mlp_path)
    tensors = [node.outputs[0].name for node in model.graph][:2]
    source = compiler.data_source(mlp_npz)
    before = dict(calibration.STATS)
    results = []
    threads = [threading.Thread(target=lambda: results.append(calibration.collect(model_io.load_model(mlp_path), tensors,
                                                                                   source, tmp_path / "cache")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {k: calibration.STATS[k] - before[k] for k in before} == {"computed": 1, "reused": 1}
    assert len(waited) == 1 and len(list((tmp_path / "cache").glob("hist-*.npz"))) == 1
    assert all(np.array_equal(results[0][t].counts, results[1][t].counts) for t in tensors)
    fresh = calibration.collect(model, tensors, source, None)      # no cache: measured again, the same
    assert all(np.array_equal(fresh[t].counts, results[0][t].counts) for t in tensors)
