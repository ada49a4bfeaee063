"""Ctrl-C in the middle of a compile, as a user does it: a real SIGINT to the `sparsecc`
process while a search runs. Exit 130, one line saying so, and nothing left behind: no
output folder, no temporary folder beside it (.OUT.tmp-*), no partial file in the cache
(only complete statistics and checkpoints), no temporary model copy in TMPDIR.
(tests/test_atomic.py interrupts at chosen points in process, and SIGTERM as well.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SAMPLE, SAMPLE_MODEL, VALID_TXT


def test_sigint_during_a_search_leaves_nothing_behind(tmp_path):
    work, scratch, cache = tmp_path / "work", tmp_path / "scratch", tmp_path / "cache"
    work.mkdir()
    scratch.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsecc.cli", "compile", str(SAMPLE_MODEL), "--calib", str(VALID_TXT),
         "--tokenizer", str(SAMPLE), "--seq-len", "64", "--windows", "64", "--sparsity", "0.5",
         "--search", "allocate-sparsity", "--search-option", "step=0.02", "--cache-dir", str(cache),
         "-o", str(work / "out")],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(scratch)})
    seen = []
    for line in proc.stderr:   # wait until the search is under way
        seen.append(line)
        if "allocate-sparsity" in line:
            break
    time.sleep(1.5)            # into its dense statistics or its moves
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(seen) + err
    assert proc.stdout.read() == ""
    lines = err.splitlines()
    assert lines[-1] == "sparsecc: interrupted; no output written", err
    assert sum("interrupted" in line for line in lines) == 1 and "Traceback" not in err
    assert list(work.iterdir()) == []                 # no OUT, no .OUT.tmp-*, no .OUT.old-*
    # no ONNX Runtime model copy (.ses: ONNX Runtime's own session id file, not a model, reused by every run)
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith((".npz", ".json", ".lock"))]
    assert leftovers == []                            # no partial statistics or checkpoint


def test_a_signal_turned_into_a_library_error_is_still_an_interrupt(monkeypatch, capsys):
    """onnxruntime turns the KeyboardInterrupt of a Ctrl-C inside its import into ImportError:
    once a signal came, any error on the way out is the interrupt (exit 128 + signal), and
    without one an error is itself."""
    from sparsecc import cli, signals

    def import_interrupted(args):
        raise ImportError("onnxruntime: KeyboardInterrupt during import")

    monkeypatch.setattr(cli, "_list", import_interrupted)
    monkeypatch.setattr(signals, "_received", None)
    with pytest.raises(ImportError):
        cli.main(["list", "passes"])
    monkeypatch.setattr(signals, "_received", signal.SIGINT)
    assert cli.main(["list", "passes"]) == 130
    assert capsys.readouterr().err == "sparsecc: interrupted; no output written\n"
    monkeypatch.setattr(signals, "_received", signal.SIGTERM)
    assert cli.main(["list", "passes"]) == 128 + signal.SIGTERM
