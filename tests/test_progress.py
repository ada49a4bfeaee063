"""Progress and logging (issue 7, part 3): with --json, stdout holds one JSON document and
nothing else, and stderr stays empty; with -q a successful run writes nothing on stderr; every
long loop (calibration, each search, fine-tuning, evaluation, simulation) runs under a
progress bar whose total is known, so it shows an ETA, which a real terminal then gets."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import tqdm
from conftest import mlp_feeds, mlp_model, save, save_npz

from sparsecc import cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A model, its feeds, an ort compile, a seneca compile and a tiny transformers model."""
    root = tmp_path_factory.mktemp("progress")
    paths = {"model": save(mlp_model(), root / "mlp.onnx"), "npz": save_npz(mlp_feeds(3, rows=8), root / "feeds.npz")}
    for target in ("ort", "seneca"):
        paths[target] = root / target
        assert cli.main(["-q", "compile", str(paths["model"]), "--calib", str(paths["npz"]), "--sparsity", "0.4",
                         "--target", target, "-o", str(paths[target]), "--no-cache"]) == 0
    from test_step_graphs import tiny

    paths["hf"] = root / "mamba"
    tiny("mamba").save_pretrained(paths["hf"])
    return paths


def commands(p: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """One successful run of every subcommand (eval also with -o)."""
    return {
        "compile": ["compile", str(p["model"]), "--calib", str(p["npz"]), "-o", str(out / "c"), "--no-cache"],
        "eval": ["eval", str(p["ort"] / "model.onnx"), "--ppl", str(p["npz"])],
        "eval -o": ["eval", str(p["ort"] / "model.onnx"), "--ppl", str(p["npz"]), "-o", str(out / "e")],
        "simulate": ["simulate", str(p["seneca"]), "--text", str(p["npz"]), "--windows", "3", "-o", str(out / "s")],
        "list passes": ["list", "passes"],
        "list backends": ["list", "backends"],
        "list targets": ["list", "targets"],
        "export": ["export", str(p["hf"]), "-o", str(out / "x"), "--check-tokens", "4"],
        "inspect": ["inspect", str(p["seneca"])],
    }


def test_every_subcommand_is_covered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.choices and "compile" in a.choices)
    covered = {name.split()[0] for name in commands({k: Path() for k in ("model", "npz", "ort", "seneca", "hf")}, Path())}
    # sweep runs on Ray: its --json run (one document on stdout, nothing on stderr, from a fresh
    # process that starts Ray) is test_sweep.py's test_without_an_address_...
    assert set(sub.choices) == covered | {"sweep"}


NAMES = list(commands({k: Path() for k in ("model", "npz", "ort", "seneca", "hf")}, Path()))


@pytest.mark.parametrize("name", NAMES)
def test_json_prints_one_document_and_nothing_else(name, inputs, tmp_path):
    """As a user runs it, in a fresh process (import-time warnings of the libraries count)."""
    proc = subprocess.run([sys.executable, "-m", "sparsecc.cli", *commands(inputs, tmp_path)[name], "--json"],
                          capture_output=True, text=True, env=os.environ | {"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""                            # --json is quiet: no progress, logs or warnings
    document = json.loads(proc.stdout)                  # the whole of stdout is one document
    assert isinstance(document, dict) and document


@pytest.mark.parametrize("name", NAMES)
def test_quiet_prints_only_results(name, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))   # torch's, kept out of TMPDIR
    capfd.readouterr()
    assert cli.main(["-q", *commands(inputs, tmp_path)[name]]) == 0
    out, err = capfd.readouterr()
    assert err == "" and out.strip()                    # the summary for people on stdout, nothing on stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


class Recorder(tqdm.tqdm):
    made: list[tuple[str, float | None]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Recorder.made.append((kwargs.get("desc", ""), self.total))   # total: given, or the iterable's length


@pytest.mark.parametrize("extra, desc", [
    ([], "calibrating (1/2)"),
    (["--search", "allocate-sparsity"], "allocate-sparsity"),
    (["--search", "greedy-blocks"], "greedy-blocks"),
    (["--search", "sequential-search"], "sequential search"),
    (["--finetune-steps", "2"], "finetune-bands"),
])
def test_calibration_and_searches_run_under_bars_with_totals(extra, desc, inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    Recorder.made = []
    assert cli.main(["compile", str(inputs["model"]), "--calib", str(inputs["npz"]), "-o", str(tmp_path / "out"),
                     "--no-cache", *extra]) == 0
    totals = [total for d, total in Recorder.made if d.startswith(desc)]
    assert totals and all(t is not None and t > 0 for t in totals), Recorder.made


@pytest.mark.parametrize("name, desc", [("eval", "evaluating"), ("simulate", "simulating")])
def test_eval_and_simulation_run_under_bars_with_totals(name, desc, inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    Recorder.made = []
    assert cli.main(commands(inputs, tmp_path)[name]) == 0
    assert (desc, 3) in Recorder.made                  # one step per window of the 3 in the .npz


def test_a_terminal_sees_the_bar_with_its_eta(tmp_path):
    """`sparsecc compile` with stderr on a pseudo-terminal: the calibration bar is drawn with
    a percentage, n/total and elapsed<remaining."""
    model = save(mlp_model(), tmp_path / "mlp.onnx")
    npz = save_npz(mlp_feeds(40, rows=64), tmp_path / "feeds.npz")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "sparsecc.cli", "compile", str(model), "--calib", str(npz),
                             "-o", str(tmp_path / "out"), "--no-cache"], stdout=subprocess.PIPE, stderr=slave,
                            env=os.environ | {"TQDM_MININTERVAL": "0"})
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:    # the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = screen.decode("utf-8", "replace")
    assert re.search(r"calibrating \(1/2\):\s+\d+%\|[^|]*\|\s*\d+/40 \[\d\d:\d\d<\d\d:\d\d", text), text[-2000:]
    assert "[3/3] calibrate-thresholds" in text        # the log lines still come through
    assert proc.stdout.read().decode().startswith("calibrate-thresholds: ")   # the result on stdout
