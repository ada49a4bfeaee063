"""sparsecc sweep (issue 19) on a local Ray runtime of 2 CPUs, started once for this module:
a 4-cell grid on the tiny sample equals the same compiles and evals run one by one, and its
cells calibrate once through the shared cache; a failing cell is reported with its one-line
error while the rest finish; a worker that dies is retried; a second run skips the complete
cells; Ctrl-C leaves only complete cells; the embedded runtime
(no --address) and the one-line errors of a bad sweep file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, SAMPLE_MODEL, TEST_TXT, VALID_TXT, listing

from sparsecc import cli, compiler, report_page, sweep

DATA = {"calib": str(VALID_TXT), "tokenizer": str(SAMPLE), "seq_len": 32, "windows": 4}
EVAL = {"ppl": str(TEST_TXT), "windows": 4}


def sweep_file(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump({"models": {"tiny": str(SAMPLE_MODEL)}, "data": DATA, "eval": EVAL} | spec))
    return path


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray runtime of 2 CPUs for the module, on the loopback only as the sweep's own
    (its sockets in a short private folder)."""
    ray = sweep._import_ray(None)
    temp = tempfile.mkdtemp(prefix="sweep-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", _temp_dir=temp)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def grid(ray_address, tmp_path_factory) -> dict[str, Path]:
    """A 2 x 2 grid (mode x sparsity) on the tiny sample, run once."""
    root = tmp_path_factory.mktemp("grid")
    path = sweep_file(root / "sweep.yaml", grid={"mode": ["mac-weighted", "uniform"], "sparsity": [0.3, 0.5]})
    out, cache = root / "out", root / "cache"
    assert cli.main(["-q", "sweep", str(path), "-o", str(out), "--cache-dir", str(cache)]) == 0
    # this run's figures (a second run writes its own timings.json)
    timings = json.loads((out / "timings.json").read_text())["cells"]
    return {"file": path, "out": out, "cache": cache, "timings": timings}


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


CELLS = {f"tiny_mode-{m}_sparsity-{s}": (m, s) for m in ("mac-weighted", "uniform") for s in (0.3, 0.5)}


def test_grid_cells_are_the_compiles_and_evals_run_one_by_one(grid, tmp_path):
    out = grid["out"]
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(CELLS)
    for name in ("tiny_mode-mac-weighted_sparsity-0.3", "tiny_mode-uniform_sparsity-0.5"):   # one of each mode
        mode, sparsity = CELLS[name]
        serial = tmp_path / name
        assert cli.main(["-q", "compile", str(SAMPLE_MODEL), "--calib", str(VALID_TXT), "--tokenizer", str(SAMPLE),
                         "--seq-len", "32", "--windows", "4", "--mode", mode, "--sparsity", str(sparsity),
                         "--no-cache", "-o", str(serial)]) == 0
        cell = out / "cells" / name
        for file in ("model.onnx", "config.yaml", "report.md"):
            assert (cell / file).read_bytes() == (serial / file).read_bytes(), (name, file)
    # one evaluation redone by hand: the same figures as the cell's eval report
    name = "tiny_mode-uniform_sparsity-0.5"
    cell = out / "cells" / name
    mine = compiler.evaluate(tmp_path / name / "model.onnx",
                             compiler.data_source(TEST_TXT, SAMPLE, 32, 4), SAMPLE_MODEL)["result"]
    assert json.loads((cell / "eval" / "report.json").read_text())["result"] == json.loads(json.dumps(mine))


def test_the_report_gathers_every_cell_one_line_per_method(grid):
    rep = report(grid["out"])
    assert rep["kind"] == "eval-sweep" and rep["sweep"] | {"file": None} == {"file": None, "cells": 4, "ok": 4, "failed": 0}
    assert [row["cell"] for row in rep["cells"]] == list(CELLS)
    for run in rep["runs"]:
        cell = grid["out"] / "cells" / run["cell"]
        assert run["model"] == str(cell / "model.onnx")
        assert run["result"] == json.loads((cell / "eval" / "report.json").read_text())["result"]
        assert run["method"] == f"mode-{CELLS[run['cell']][0]}"    # the line it is drawn on: its method
        assert abs(run["result"]["macs"]["body"]["sparsity"] - CELLS[run["cell"]][1]) < 0.05
    markdown = (grid["out"] / "report.md").read_text()
    for run in rep["runs"]:
        assert f"| {run['cell']} | tiny | mode={CELLS[run['cell']][0]}, sparsity={CELLS[run['cell']][1]} |" in markdown
        assert f"| {run['result']['perplexity']:.3f} |" in markdown
    page = (grid["out"] / "report.html").read_text()
    assert page == report_page.render(rep) and 'data-figure="curve"' in page
    assert "mode-uniform" in page and "mode-mac-weighted" in page and "sparsecc sweep: 4 cells" in page


def test_cells_with_the_same_model_and_data_calibrate_once(grid):
    """Each cell collects statistics three times: dense over all windows and over the every 4th
    the refine round revisits (the same model, data and tensors in every cell), then refined on
    those with its thresholds in place (the same for cells whose thresholds agree: on this
    model, without natural sparsity, mac-weighted and uniform at one target do). Each distinct
    one is measured once, by whichever cell came first (two start at once), and read by the
    others: the measurements made are exactly the cache's entries."""
    timings = grid["timings"]
    computed = sum(t["statistics"]["computed"] for t in timings.values())
    reused = sum(t["statistics"]["reused"] for t in timings.values())
    entries = sorted(grid["cache"].glob("hist-*.npz"))
    assert computed + reused == 3 * 4 and computed == len(entries) and reused >= 6, timings


def test_a_second_run_skips_complete_cells_and_redoes_a_missing_one(grid, capsys):
    """On the grid's own folder (the outputs it leaves are those it found, wall times aside)."""
    out = grid["out"]
    before = listing(out)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}
    assert cli.main(["sweep", str(grid["file"]), "-o", str(out), "--cache-dir", str(grid["cache"])]) == 0
    assert "4 cells, 4 complete already, 0 to run" in capsys.readouterr().err
    assert listing(out) == before | {"timings.json": b'{\n  "cells": {}\n}\n'}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())       # not even rewritten
    gone = "tiny_mode-uniform_sparsity-0.3"
    shutil.rmtree(out / "cells" / gone)
    assert cli.main(["sweep", str(grid["file"]), "-o", str(out), "--cache-dir", str(grid["cache"])]) == 0
    assert "4 cells, 3 complete already, 1 to run" in capsys.readouterr().err
    after = listing(out)
    assert list(json.loads(after["timings.json"])["cells"]) == [gone]
    # redone byte for byte, but the wall times (timings.json: the compile's seconds per pass)
    wall_times = [k for k in after if k.endswith("timings.json")]
    assert {k: v for k, v in after.items() if k not in wall_times} == {k: v for k, v in before.items() if k not in wall_times}


def test_changed_settings_make_a_cell_incomplete(grid):
    cells = sweep.load(grid["file"], grid["cache"])
    assert all(sweep.complete(c, grid["out"]) is not None for c in cells)
    cell = cells[0] | {"eval": cells[0]["eval"] | {"windows": 5}}
    assert sweep.complete(cell, grid["out"]) is None


def test_a_failing_cell_is_isolated_and_a_killed_worker_is_retried(ray_address, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.yaml"   # calibrate-thresholds without insert-thresholds: fails on the model, not in the file
    bad.write_text(yaml.safe_dump({"passes": [{"pass": "discover-sites"}, {"pass": "calibrate-thresholds"}]}))
    path = sweep_file(tmp_path / "sweep.yaml", simulate={"tokens": 4},
                      cells=[{"name": "crash", "sparsity": 0.5, "target": "seneca"}, {"name": "bad", "pipeline": str(bad)},
                             {"name": "gpu", "sparsity": 0.5, "resources": {"num_gpus": 1}}])
    marker = tmp_path / "crashed"
    monkeypatch.setenv(sweep.CRASH_ONCE, f"tiny_crash={marker}")
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "-o", str(out), "--no-cache"]) == 1
    captured = capsys.readouterr()
    assert marker.exists()       # the first try did die
    rows = {row["cell"]: row for row in report(out)["cells"]}
    assert rows["tiny_crash"]["status"] == "ok" and (out / "cells" / "tiny_crash" / "simulation" / "report.json").is_file()
    assert rows["tiny_crash"]["simulation"]["energy_ratio"] > 1
    # the bad cell's error is the one `sparsecc compile` gives for that pipeline, on one line
    assert cli.main(["-q", "compile", str(SAMPLE_MODEL), "--pipeline", str(bad), "--calib", str(VALID_TXT), "--tokenizer",
                     str(SAMPLE), "--seq-len", "32", "--windows", "4", "--no-cache", "-o", str(tmp_path / "c")]) == 2
    expected = capsys.readouterr().err.strip().removeprefix("sparsecc: error: ")
    assert rows["tiny_bad"] == {"cell": "tiny_bad", "model": "tiny", "options": {"pipeline": str(bad)}, "target": "ort",
                                "status": "failed", "error": expected}
    assert rows["tiny_gpu"]["status"] == "failed" and "1 GPU(s), more than any node" in rows["tiny_gpu"]["error"]
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["tiny_crash"]     # nothing of the failed cells
    assert f"tiny_bad: failed: {expected}\n" in captured.out
    assert "\n".join(r["error"] for r in rows.values() if "error" in r).count("\n") == 1   # one line each


def test_a_worker_dying_on_every_try_fails_its_cell_only(ray_address, tmp_path, monkeypatch):
    path = sweep_file(tmp_path / "sweep.yaml", retries=0, cells=[{"name": "dies", "sparsity": 0.5}])
    monkeypatch.setenv(sweep.CRASH_ONCE, f"tiny_dies={tmp_path / 'crashed'}")
    assert cli.main(["-q", "sweep", str(path), "-o", str(tmp_path / "out"), "--no-cache"]) == 1
    [row] = report(tmp_path / "out")["cells"]
    assert row["status"] == "failed" and row["error"].startswith("its worker died on each of 1 tries (WorkerCrashedError)")
    page = (tmp_path / "out" / "report.html").read_text()   # no run to draw: the page says why, and lists the cell
    assert "no cell of the sweep completed" in page and "tiny_dies" in page and "<svg" not in page


def test_ctrl_c_leaves_only_complete_cells(ray_address, tmp_path):
    """A real SIGINT to a `sparsecc sweep` that joined the module's Ray cluster (--address)."""
    path = sweep_file(tmp_path / "sweep.yaml", grid={"sparsity": [0.2, 0.3, 0.4]})
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "sparsecc.cli", "sweep", str(path), "-o", str(out), "--address",
                             ray_address, "--cache-dir", str(cache)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("[1/3]"):
            break
    proc.send_signal(signal.SIGINT)
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert err.splitlines()[-1] == "sparsecc: interrupted; the complete cells are kept; run it again to go on", err
    assert "Traceback" not in err and proc.stdout.read() == ""
    cells = sweep.load(path, cache)
    kept = sorted(p.name for p in (out / "cells").iterdir())
    assert 1 <= len(kept) < 3 and not [k for k in kept if k.startswith(".")], kept   # no unfinished folder
    # what is kept is complete: a second run skips it (see the resume test) and runs the rest
    assert all(sweep.complete(c, out) is not None for c in cells if c["name"] in kept)
    assert not (out / "report.json").exists()


def test_a_cell_stops_itself_when_the_stop_file_appears(tmp_path):
    """The sweep's cancellation without ray.cancel (which races a finishing task): the stop
    file interrupts the cell's thread, and a cell not yet started returns at once."""
    stop = tmp_path / sweep.STOP_FILE
    threading.Timer(0.3, stop.touch).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt), sweep._stopped_by(stop):
        while time.monotonic() - start < 20:
            time.sleep(0.01)
    assert time.monotonic() - start < 5
    with sweep._stopped_by(stop.with_name("never")):    # no stop file: nothing happens
        time.sleep(0.3)
    [cell] = sweep.load(sweep_file(tmp_path / "sweep.yaml", cells=[{"sparsity": 0.5}]), None)
    assert sweep.run_cell(cell, str(tmp_path)) == {"status": "cancelled"}
    assert not (tmp_path / "cells").exists()


def test_without_an_address_the_sweep_starts_and_stops_its_own_ray(ray_address, tmp_path):
    """A fresh process: Ray started on this machine (1 CPU), nothing but the JSON report on
    stdout, nothing on stderr, and Ray's temporary folder (under RAY_TMPDIR: a short path, for
    Ray's sockets) removed."""
    path = sweep_file(tmp_path / "sweep.yaml", cells=[{"name": "only", "sparsity": 0.5}])
    scratch = Path(tempfile.mkdtemp(prefix="sweep-", dir="/tmp"))
    try:
        done = subprocess.run([sys.executable, "-m", "sparsecc.cli", "--json", "sweep", str(path), "-o",
                               str(tmp_path / "out"), "--cpus", "1", "--no-cache"], capture_output=True, text=True,
                              timeout=300, env=os.environ | {"RAY_TMPDIR": str(scratch)})
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert json.loads(done.stdout) == report(tmp_path / "out")
        assert list(scratch.iterdir()) == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_without_ray_one_line_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)      # `import ray` fails as when it is not installed
    path = sweep_file(tmp_path / "sweep.yaml", cells=[{"sparsity": 0.5}])
    assert cli.main(["sweep", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"sparsecc: error: sweeps run on Ray, which is not installed; install the sweep extra: {sweep.EXTRA}\n"


BAD = [
    ({"models": {}}, "models: must map a name to each model file"),
    ({"models": {"tiny": "nope.onnx"}}, "models: tiny: model file not found: nope.onnx"),
    ({"eval": {}}, "eval: needs ppl:"),
    ({"eval": EVAL | {"window": 3}}, "eval: unknown key 'window'; valid keys: ppl, tokenizer, seq_len, windows"),
    ({"data": DATA | {"calib": "nowhere.txt"}}, "data: calib: nowhere.txt not found"),
    ({"grid": {"sparsity": 0.5}}, "grid: sparsity must be a list of values (got 0.5)"),
    ({"grid": {"sparsty": [0.5]}}, "grid sparsty=0.5: unknown option 'sparsty'; valid options: pipeline, target,"),
    ({"grid": {"sparsity": [0.5, 1.5]}}, "grid sparsity=1.5: calibrate-thresholds: sparsity must be in [0, 1)"),
    ({"cells": [{"search": "fast"}]}, "cells[1]: unknown search 'fast'; choose one of calibrate-thresholds"),
    ({"cells": [{"pipeline": "samples/pipeline.yaml", "sparsity": 0.5}]}, "cells[1]: sparsity conflicts with pipeline"),
    ({"cells": [{"target": "gpu9"}]}, "cells[1]: target must be one of ort, seneca (got 'gpu9')"),
    ({"cells": [{"resources": {"num_cpus": 0}}]}, "cells[1]: resources: num_cpus must be a number above 0 (got 0)"),
    ({"cells": [{"name": "a"}, {"name": "a", "sparsity": 0.4}]}, "two cells are named 'tiny_a'"),
    ({"cells": []}, "no cells: give grid: (option: [values]) or cells: (a list)"),
    ({"retries": -1}, "retries must be an integer 0 or more (got -1)"),
    ({"sweeps": 3}, "unknown key 'sweeps'; valid keys: schema, models"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(":")[0][:30] for _, m in BAD])
def test_a_bad_sweep_file_is_one_line_and_writes_nothing(tmp_path, capsys, change, message):
    spec = {"models": {"tiny": str(SAMPLE_MODEL)}, "data": DATA, "eval": EVAL, "cells": [{"sparsity": 0.5}]} | change
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["sweep", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsecc: error: {path}: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_not_a_sweeps_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    path = sweep_file(tmp_path / "sweep.yaml", cells=[{"sparsity": 0.5}])
    assert cli.main(["sweep", str(path), "-o", str(tmp_path / "out")]) == 2
    assert "is not a sweep's (no sweep.yaml); choose another -o or empty it" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
