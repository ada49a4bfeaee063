"""End to end on the bundled sample: `sparsecc compile` then `sparsecc eval`, in process and
through the installed console script."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, SAMPLE_MODEL, TEST_TXT, VALID_TXT

from sparsecc import cli

TARGET = 0.5


def console_script() -> str:
    beside = Path(sys.executable).with_name("sparsecc")
    found = str(beside) if beside.is_file() else shutil.which("sparsecc")
    assert found, "the sparsecc console script is not installed (pip install -e '.[test]')"
    return found


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One compile of the sample, shared by the tests of this module."""
    for path in (SAMPLE_MODEL, VALID_TXT, TEST_TXT, SAMPLE / "tokenizer.json"):
        assert path.is_file(), f"missing test input {path}"
    root = tmp_path_factory.mktemp("e2e")
    out = root / "out"
    rc = cli.main(["compile", str(SAMPLE_MODEL), "--sparsity", str(TARGET), "--calib", str(VALID_TXT),
                   "--tokenizer", str(SAMPLE), "--windows", "8", "--seq-len", "64", "-o", str(out),
                   "--cache-dir", str(root / "cache")])
    return rc, root, out


def test_compile_writes_everything(compiled):
    rc, root, out = compiled
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.onnx", "report.html", "report.json", "report.md",
                                                     "timings.json"]
    assert sorted(p.name for p in root.iterdir()) == ["cache", "out"]   # no temporary folders left
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "sparsecc.report/1"
    assert report["source"]["model"] == str(SAMPLE_MODEL.resolve())
    assert report["data"]["windows"] == 8 and report["data"]["tokens"] == 8 * 64
    calib = report["passes"][2]["details"]
    assert calib["target"] == TARGET and calib["mode"] == "mac-weighted"
    assert abs(calib["calibrated_model_sparsity"] - TARGET) <= 0.005
    sites = report["sites"]
    assert len(sites) == 29 and sum(s["head"] for s in sites) == 1
    assert all(s["threshold"] for s in sites if not s["head"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"] == {"calib": str(VALID_TXT.resolve()), "tokenizer": str(SAMPLE.resolve()),
                              "seq_len": 64, "windows": 8}
    assert "Target 50.0%" in (out / "report.md").read_text()


def test_eval_json(compiled, capsys):
    _, _, out = compiled
    capsys.readouterr()
    rc = cli.main(["eval", str(out / "model.onnx"), "--ppl", str(TEST_TXT), "--windows", "8", "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    result = json.loads(captured.out)["result"]   # stdout holds the JSON and nothing else
    assert captured.err == ""                      # --json is quiet on stderr
    assert math.isfinite(result["perplexity"]) and 1 < result["perplexity"] < 2048
    # The reference (the uncompiled source) comes from config.yaml.
    assert result["reference_perplexity"] < result["perplexity"] * 1.5
    assert result["tokens"] == 8 * 63
    assert abs(result["macs"]["body"]["sparsity"] - TARGET) <= 0.03
    assert result["macs"]["all"]["sparsity"] < result["macs"]["body"]["sparsity"]
    assert 0.9 < result["output_error"]["mean_cosine"] <= 1.0 + 1e-9
    thresholded = [s for s in result["sites"] if s["thresholded"]]
    assert len(thresholded) == 28
    for s in thresholded:
        assert abs(s["sparsity"] - TARGET) <= 0.1, s


def test_eval_with_report_folder(compiled, tmp_path, capsys):
    _, _, out = compiled
    rc = cli.main(["eval", str(out / "model.onnx"), "--ppl", str(TEST_TXT), "--windows", "2", "--no-reference",
                   "-o", str(tmp_path / "ev")])
    text = capsys.readouterr().out
    assert rc == 0
    assert "perplexity" in text and "effective-MAC sparsity" in text and "vs reference" not in text
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["kind"] == "eval" and report["reference"] is None and "output_error" not in report["result"]
    assert (tmp_path / "ev" / "report.md").is_file()


def test_console_script_eval(compiled, tmp_path):
    _, _, out = compiled
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    proc = subprocess.run([console_script(), "--json", "eval", str(out / "model.onnx"), "--ppl", str(TEST_TXT),
                           "--windows", "4"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["kind"] == "eval"
    assert math.isfinite(payload["result"]["perplexity"])
    assert abs(payload["result"]["macs"]["body"]["sparsity"] - TARGET) <= 0.05
    assert not list(tmp.glob("sparsecc*"))  # its temporary model copy is gone (other libraries may leave files)


PASSES = ["allocate-sparsity", "calibrate-thresholds", "compensate-lowrank", "discover-sites", "distill", "finetune-bands", "fold-qdq", "greedy-blocks", "insert-thresholds", "partition",
          "quantize-activations", "quantize-weights", "sequential-search", "smooth-activations", "weight-scores"]


def test_list_passes_and_backends(capsys):
    assert cli.main(["list", "passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == PASSES
    assert cli.main(["list", "passes", "-v"]) == 0
    text = capsys.readouterr().out
    assert "sparsity (float in [0, 1), default 0.5)" in text and "per_consumer (bool, default False)" in text
    assert cli.main(["list", "backends"]) == 0
    backends = capsys.readouterr().out.splitlines()
    assert [b.split()[0] for b in backends] == ["ort", "seneca"] and "ONNX Runtime" in backends[0]
    assert cli.main(["list", "backends", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"ort", "seneca"}
    assert cli.main(["--json", "list", "passes"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(rows) == PASSES
    assert "mac-weighted" in json.dumps(rows["calibrate-thresholds"]) and "per_consumer" in json.dumps(rows["insert-thresholds"])


def test_version_and_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().startswith("sparsecc ")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compile"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("argv, mention", [
    (["compile"], "required: model, -o/--out"),
    (["compile", "m.onnx", "-o", "o", "--quant", "w3"], "invalid choice: 'w3'"),
    (["simulate"], "required: dir, --text"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["inspect"], "required: path"),
    (["eval", "m.onnx", "--windows", "many"], "invalid int value: 'many'"),
])
def test_usage_errors_are_one_line(argv, mention, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sparsecc: error: ") and mention in err[0]


def test_quant_w8_then_thresholds(mlp_path, mlp_npz, tmp_path, capsys):
    import onnx

    out = tmp_path / "q"
    assert cli.main(["compile", str(mlp_path), "--calib", str(mlp_npz), "--quant", "w8", "--sparsity", "0.4",
                     "-o", str(out), "--no-cache"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["discover-sites", "quantize-weights", "insert-thresholds",
                                                     "calibrate-thresholds"]
    assert report["passes"][1]["config"] == {"bits": 8, "group": 0, "include_head": True}
    model = onnx.load(str(out / "model.onnx"))
    kinds = {i.name: i.data_type for i in model.graph.initializer}
    assert all(kinds[s["weight"]] == onnx.TensorProto.INT8 for s in report["sites"])
    calib = report["passes"][3]["details"]
    assert abs(calib["calibrated_model_sparsity"] - 0.4) < 0.01
    # The resolved config replays the same run.
    again = tmp_path / "again"
    assert cli.main(["compile", str(mlp_path), "--pipeline", str(out / "config.yaml"), "--calib", str(mlp_npz),
                     "-o", str(again), "--no-cache"]) == 0
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_quant_conflicts_with_pipeline(mlp_path, tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("passes: [discover-sites]\n")
    assert cli.main(["compile", str(mlp_path), "--pipeline", str(tmp_path / "p.yaml"), "--quant", "w8",
                     "-o", str(tmp_path / "o")]) == 2
    assert "--quant conflicts with --pipeline" in capsys.readouterr().err


def test_search_flags_compose_the_pipeline(mlp_path, mlp_npz, tmp_path, capsys):
    """--search picks the pass that sets the thresholds (with --sparsity and --search-option);
    --weight-scores and --compensate-rank go before it; the run meets its target."""
    out = tmp_path / "s"
    assert cli.main(["compile", str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.4", "--search",
                     "allocate-sparsity", "--search-option", "windows=2", "--search-option", "step=0.1",
                     "--weight-scores", "--compensate-rank", "2", "-o", str(out), "--no-cache"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["discover-sites", "insert-thresholds", "weight-scores",
                                                     "compensate-lowrank", "allocate-sparsity"]
    search = report["passes"][4]
    assert search["config"]["windows"] == 2 and search["config"]["step"] == 0.1 and search["config"]["sparsity"] == 0.4
    assert abs(search["details"]["calibrated_model_sparsity"] - 0.4) < 0.01
    assert "allocate-sparsity: target 40%" in capsys.readouterr().out


@pytest.mark.parametrize("extra, mention", [
    (["--search", "sequential-search", "--sparsity", "0.5"], "sequential-search has no sparsity target"),
    (["--search-option", "loss_inc"], "--search-option takes KEY=VALUE"),
    (["--search-option", "loss_inc=1.01"], "calibrate-thresholds: unknown option 'loss_inc'"),
    (["--search", "greedy-blocks", "--mode", "uniform"], "--mode uniform applies to calibrate-thresholds only"),
    (["--search", "allocate-sparsity", "--search-option", "bands=0"], "bands must be at least 1"),
])
def test_search_flag_errors(mlp_path, mlp_npz, tmp_path, capsys, extra, mention):
    assert cli.main(["compile", str(mlp_path), "--calib", str(mlp_npz), "-o", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and mention in err[0]
    assert not (tmp_path / "o").exists()


def test_search_flags_conflict_with_pipeline(mlp_path, tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("passes: [discover-sites]\n")
    assert cli.main(["compile", str(mlp_path), "--pipeline", str(tmp_path / "p.yaml"), "--finetune-steps", "3",
                     "-o", str(tmp_path / "o")]) == 2
    assert "--finetune-steps conflicts with --pipeline" in capsys.readouterr().err
