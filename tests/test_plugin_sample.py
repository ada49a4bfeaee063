"""samples/plugin_backend: a complete third-party backend package, installed into a throwaway
virtual environment (the shared environment is left as it is) and used through the CLI there."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import site
import subprocess
import sys

import onnx
import onnx_ir as ir
import pytest
from conftest import REPO, mlp_model, save
from onnx import helper

from sparsecc import backends, ops
from sparsecc.sites import analyze

SAMPLE = REPO / "samples" / "plugin_backend"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A virtual environment that sees this environment's packages (sparsecc included) through
    a .pth file, with sparsecc-stats installed into it alone."""
    root = tmp_path_factory.mktemp("plugin")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    # `import` lines of a .pth run at start-up; addsitedir also runs the .pth files there (the editable sparsecc)
    with open(os.path.join(own, "outer.pth"), "w") as f:
        f.write("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    source = root / "src"   # build from a copy: setuptools writes build/ and egg-info beside the sources
    shutil.copytree(SAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return python


def sparsecc_in(python, *args, cwd):
    """The sparsecc command line run by the venv's interpreter."""
    return subprocess.run([str(python), "-c", "import sys; from sparsecc.cli import main; sys.exit(main())", *args],
                          capture_output=True, text=True, cwd=cwd)


def test_installed_plugin_is_listed_and_compiles(venv, tmp_path, mlp_path, mlp_npz):
    listed = sparsecc_in(venv, "list", "backends", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert set(rows) == {"ort", "seneca", "stats"} and "per-site MACs" in rows["stats"]["summary"]
    assert "stats" not in backends.registry()   # this environment did not change

    out = tmp_path / "out"
    done = sparsecc_in(venv, "compile", str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.5",
                       "--target", "stats", "-o", str(out), "--no-cache", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["backend"] == "stats" and report["target"]["declined"] == {}
    assert {"stats.csv", "stats.json"} <= set(report["outputs"])

    model = ir.load(out / "model.onnx")
    sites = analyze(model.graph).sites
    levels = {n.name: ops.threshold_level(n) for n in model.graph if ops.is_threshold(n)}
    table = list(csv.DictReader(io.StringIO((out / "stats.csv").read_text())))
    assert [r["site"] for r in table] == [s.node for s in sites]
    for row, s in zip(table, sites):
        assert (int(row["in_features"]), int(row["out_features"]), int(row["macs_per_token"])) == \
               (s.in_features, s.out_features, s.macs_per_token)
        assert row["threshold"] == (s.threshold or "")
        assert (float(row["level"]) == levels[s.threshold]) if s.threshold else row["level"] == ""
    assert any(float(r["level"]) > 0 for r in table if r["threshold"])   # calibrated, not the inserted t = 0
    totals = json.loads((out / "stats.json").read_text())
    assert totals["dense_macs_per_token"]["all"] == sum(s.macs_per_token for s in sites)
    assert totals["thresholded_macs_per_token"] == sum(s.macs_per_token for s in sites if s.threshold)
    assert report["target"]["artifacts"] == {"files": ["stats.csv", "stats.json"], "sites": len(sites),
                                             "dense_macs_per_token": totals["dense_macs_per_token"]["all"]}


def test_installed_plugin_declines_what_it_cannot_count(venv, tmp_path):
    """A node of another domain is declined with the reason; the rest is still lowered."""
    proto = mlp_model()
    graph = proto.graph
    output = graph.output[0].name
    producer = next(n for n in graph.node if output in n.output)
    producer.output[0] = "pre_gelu"
    graph.node.append(helper.make_node("Gelu", ["pre_gelu"], [output], name="vendor_gelu", domain="com.microsoft"))
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path = save(proto, tmp_path / "vendor.onnx")
    onnx.checker.check_model(onnx.load(path))
    out = tmp_path / "out"
    done = sparsecc_in(venv, "compile", str(path), "--target", "stats", "-o", str(out), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["declined"] == {
        "vendor_gelu": "com.microsoft::Gelu is outside the ONNX and sparsecc domains; stats cannot count its work"}
    assert len((out / "stats.csv").read_text().splitlines()) == 1 + len(analyze(ir.load(path).graph).sites)
