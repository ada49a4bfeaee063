"""The same inputs give byte-identical outputs, whether statistics are computed or cached."""
from __future__ import annotations

import json

from conftest import listing, mlp_feeds

import sparsecc
from sparsecc import cli

FILES = ("model.onnx", "report.json", "report.md", "report.html", "config.yaml")


def test_cli_compiles_are_byte_identical(mlp_path, mlp_npz, tmp_path):
    cache = tmp_path / "cache"
    runs = []
    for i, cache_args in enumerate((["--cache-dir", str(cache)],    # computes and caches
                                    ["--cache-dir", str(cache)],    # reads the cache
                                    ["--no-cache"])):
        out = tmp_path / f"run{i}"
        assert cli.main(["-q", "compile", str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.45",
                         "-o", str(out), *cache_args]) == 0
        runs.append(out)
    assert list(cache.glob("hist-*.npz")), "the first run should have cached its statistics"
    for name in FILES:
        contents = {(run / name).read_bytes() for run in runs}
        assert len(contents) == 1, name
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["schema"] == "sparsecc.report/1" and report["kind"] == "compile"
    assert sorted(report["outputs"]) == sorted(set(report["outputs"]))
    assert {"model.onnx", "report.json", "report.md", "config.yaml"} <= set(report["outputs"])
    # Nothing time-dependent in the deterministic files; timings live apart.
    timings = json.loads((runs[0] / "timings.json").read_text())
    assert set(timings) == {"discover-sites", "insert-thresholds", "calibrate-thresholds"}


def test_api_compiles_are_byte_identical(mlp_path, tmp_path):
    feeds = mlp_feeds(6, seed=3)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(sparsity=0.55), feeds, out=out)
    a, b = (listing(out) for out in outs)
    a.pop("timings.json")
    b.pop("timings.json")
    assert a == b
    assert set(a) == {"model.onnx", "report.json", "report.md", "report.html", "config.yaml"}
