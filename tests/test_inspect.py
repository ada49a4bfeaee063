"""`sparsecc inspect`: sites, shapes, thresholds, calibrated sparsity and placement of a model
or a compile output folder, as `kind key=value` lines and as JSON."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest
from conftest import SAMPLE, SAMPLE_MODEL, VALID_TXT, mlp_model, save

from sparsecc import cli, ops
from sparsecc.backends.seneca.placement import Placement
from sparsecc.inspection import inspect_path, to_text
from sparsecc.sites import analyze
from sparsecc.stepgraph import METADATA_KEY, StateSpec, StepSpec

KINDS = {"model", "sites", "compile", "backend-declined", "placement", "step-graph", "state", "declined", "site"}
FIELD = re.compile(r'([\w-]+)=("(?:[^"\\]|\\.)*"|\S+)')


def records(text: str) -> list[tuple[str, dict[str, str]]]:
    """Parse inspect's text: every line is `kind key=value ...`, nothing else."""
    out = []
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        assert kind in KINDS, line
        fields = {k: json.loads(v) if v.startswith('"') else v for k, v in FIELD.findall(rest)}
        # every token is a field: re-joining them gives the line back
        assert " ".join([kind] + [f"{k}={v}" for k, v in FIELD.findall(rest)]) == line
        out.append((kind, fields))
    return out


def sites_of(text: str) -> list[dict[str, str]]:
    return [f for kind, f in records(text) if kind == "site"]


def compile_cli(*args: str) -> None:
    assert cli.main(["compile", *args, "--no-cache", "-q"]) == 0


def body_sparsity(doc: dict) -> float:
    """MAC-weighted calibrated sparsity of the thresholded body sites, from inspect's rows."""
    rows = [r for r in doc["sites"] if not r["head"] and r["compensates"] is None]
    assert all(r["threshold"] for r in rows)
    return sum(r["macs_per_token"] * r["calibrated_sparsity"] for r in rows) / sum(r["macs_per_token"] for r in rows)


def test_plain_model_sites_and_layers():
    """The bundled sample: 4 Llama layers of 7 sites (q/k/v, o, gate/up, down) and a head."""
    doc = inspect_path(SAMPLE_MODEL)
    sites = analyze(ir.load(SAMPLE_MODEL).graph).sites
    assert doc["summary"]["sites"] == len(sites) == 29 and doc["summary"]["layers"] == 4
    assert "compile" not in doc and "placement" not in doc and "step_graph" not in doc
    for row, site in zip(doc["sites"], sites, strict=True):
        assert (row["name"], row["in_features"], row["out_features"], row["group"]) == \
               (site.node, site.in_features, site.out_features, site.group)
        assert row["layer"] == (None if site.head else site.index // 7)
        assert row["threshold"] is None and row["t"] is None and row["calibrated_sparsity"] is None
    lines = sites_of(to_text(doc))
    assert [(f["shape"], f.get("layer")) for f in lines[:8]] == [
        ("128x128", "0"), ("128x64", "0"), ("128x64", "0"), ("128x128", "0"), ("128x384", "0"), ("128x384", "0"),
        ("384x128", "0"), ("128x128", "1")]
    assert lines[-1]["head"] == "yes" and "layer" not in lines[-1] and lines[-1]["threshold"] == "-"
    assert sum(int(f["macs"]) for f in lines) == doc["summary"]["macs_per_token"]["all"] == 128 * 2048 + 4 * 196608


def test_compiled_folder_text_and_json_agree(tmp_path, mlp_path, mlp_npz, capsys):
    out = tmp_path / "out"
    compile_cli(str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.4", "-o", str(out))
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert cli.main(["inspect", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)   # stdout is one JSON document and nothing else
    assert doc == json.loads(json.dumps(inspect_path(out))) and doc["schema"] == "sparsecc.inspect/1"
    assert text == to_text(inspect_path(out))
    report = json.loads((out / "report.json").read_text())
    calib = next(p["details"] for p in report["passes"] if p["pass"] == "calibrate-thresholds")
    assert doc["compile"]["set_by"] == "calibrate-thresholds" and doc["compile"]["target"] == 0.4
    model = ir.load(out / "model.onnx")
    thresholds = {n.name: n for n in model.graph if ops.is_threshold(n)}
    by_name = {row["threshold"]: row for row in calib["thresholds"]}
    lines = {f["name"]: f for f in sites_of(text)}
    for row in doc["sites"]:
        line = lines[row["name"]]
        assert line["shape"] == f"{row['in_features']}x{row['out_features']}"
        assert int(line["macs"]) == row["macs_per_token"] and int(line["group"]) == row["group"]
        if row["threshold"] is None:   # the ReLU-fed site (natural) and the head
            assert line["threshold"] == "-" and line["t"] == "-" and "calib" not in line
            continue
        t = float(thresholds[row["threshold"]].inputs[1].const_value.numpy())
        assert row["t"] == t and float(line["t"]) == pytest.approx(t, rel=1e-5)
        assert row["calibrated_sparsity"] == by_name[row["threshold"]]["calibrated_sparsity"]
    assert {(r["name"], r["natural"], r["head"]) for r in doc["sites"] if r["threshold"] is None} == \
           {("out", "relu", False), ("head", None, True)}
    assert lines["out"]["natural"] == "relu" and lines["head"]["head"] == "yes"


def test_the_model_file_of_a_compile_output_reads_its_report(tmp_path, mlp_path, mlp_npz):
    out = tmp_path / "out"
    compile_cli(str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.4", "-o", str(out))
    folder, model = inspect_path(out), inspect_path(out / "model.onnx")
    assert model["sites"] == folder["sites"] and model["compile"] == folder["compile"]
    # the same model copied elsewhere has no report beside it: thresholds, no calibrated sparsity
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "m.onnx").write_bytes((out / "model.onnx").read_bytes())
    alone = inspect_path(tmp_path / "copy" / "m.onnx")
    assert "compile" not in alone
    assert [r["t"] for r in alone["sites"]] == [r["t"] for r in folder["sites"]]
    assert all(r["calibrated_sparsity"] is None for r in alone["sites"])


@pytest.mark.parametrize("search", ["allocate-sparsity", "sequential-search"])
def test_calibrated_sparsity_from_each_search(tmp_path, search):
    """Each search reports per-threshold sparsity in its own words; inspect's per-site values,
    MAC-weighted over the body, give back the model-wide sparsity the search reported."""
    out = tmp_path / "out"
    options = (["--sparsity", "0.4", "--search-option", "windows=1", "--search-option", "step=0.2"]
               if search == "allocate-sparsity" else ["--search-option", "loss_inc=1.02", "--search-option", "step=0.25",
                                                      "--search-option", "windows=1"])
    compile_cli(str(SAMPLE_MODEL), "--calib", str(VALID_TXT), "--tokenizer", str(SAMPLE), "--windows", "2",
                "--seq-len", "32", "--search", search, *options, "-o", str(out))
    doc = inspect_path(out)
    report = json.loads((out / "report.json").read_text())
    details = report["passes"][-1]["details"]
    assert doc["compile"]["set_by"] == search
    levels = {r["calibrated_sparsity"] for r in doc["sites"] if r["threshold"]}
    assert len(levels) > 1   # the search set different levels: a wrong mapping would show
    assert body_sparsity(doc) == pytest.approx(details["calibrated_model_sparsity"], abs=2e-3)


def test_weight_aware_and_quantized_sites(tmp_path, mlp_path, mlp_npz):
    out = tmp_path / "ws"
    compile_cli(str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.4", "--weight-scores", "--quant", "w8",
                "-o", str(out))
    doc = inspect_path(out)
    model = ir.load(out / "model.onnx")
    nodes = {n.name: n for n in model.graph if ops.is_threshold(n)}
    lines = {f["name"]: f for f in sites_of(to_text(doc))}
    for row in (r for r in doc["sites"] if r["threshold"]):
        t = nodes[row["threshold"]].inputs[1].const_value.numpy()
        assert t.ndim == 1 and row["t"] == "per-channel" and row["channels"] == t.size
        assert (row["t_min"], row["t_max"]) == (float(t.min()), float(t.max())) and row["t_min"] < row["t_max"]
        assert row["tau"] == ops.threshold_level(nodes[row["threshold"]]) > 0
        assert lines[row["name"]]["t"] == "per-channel" and float(lines[row["name"]]["tau"]) == pytest.approx(row["tau"], rel=1e-5)
    assert {r["weight_dtype"] for r in doc["sites"]} == {"int8"}   # quantize-weights stored every site as int8


def test_seneca_output_shows_cores(tmp_path):
    out = tmp_path / "sen"
    compile_cli(str(SAMPLE_MODEL), "--calib", str(VALID_TXT), "--tokenizer", str(SAMPLE), "--windows", "2",
                "--seq-len", "32", "--sparsity", "0.5", "--target", "seneca", "-o", str(out))
    placement = Placement.from_json((out / "placement.json").read_text())
    cores = placement.node_cores()
    doc = inspect_path(out)
    assert doc["placement"]["cores_used"] == len(placement.cores_used) and doc["placement"]["tiles"] == len(placement.tiles)
    lines = {f["name"]: f for f in sites_of(to_text(doc))}
    for row in doc["sites"]:
        assert row["cores"] == cores[row["name"]]
        expanded = [c for part in lines[row["name"]]["cores"].split(",")
                    for c in (range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))]
        assert expanded == row["cores"]
    assert any(len(row["cores"]) > 1 for row in doc["sites"])   # a split site shows as a range
    # the model file alone: the placement the partition pass stored in it
    assert inspect_path(out / "model.onnx")["sites"] == doc["sites"]
    header = dict(records(to_text(doc)))["placement"]
    assert header["mesh"] == f"{placement.rows}x{placement.cols}" and header["target"] == "seneca"


def test_step_graph_states(tmp_path):
    model = ir.from_proto(mlp_model())
    spec = StepSpec("rwkv", (StateSpec("layer 0 time-mix shift", (1, 32)), StateSpec("layer 0 kv", (1, "past", 8), grow_axis=1)))
    model.metadata_props[METADATA_KEY] = spec.to_json()
    path = tmp_path / "step.onnx"
    ir.save(model, path)
    doc = inspect_path(path)
    assert doc["step_graph"]["arch"] == "rwkv" and doc["step_graph"]["grows"] is True
    assert doc["step_graph"]["state_bytes"] == 32 * 4
    got = records(to_text(doc))
    assert [f for k, f in got if k == "step-graph"] == [{"arch": "rwkv", "states": "2", "state_bytes": "128", "grows": "yes"}]
    states = [f for k, f in got if k == "state"]
    assert [(s["input"], s["output"], s["shape"], s["role"]) for s in states] == [
        ("state.0", "new_state.0", "1x32", "layer 0 time-mix shift"), ("state.1", "new_state.1", "1xpastx8", "layer 0 kv")]


def test_declined_matmul_is_listed(tmp_path):
    """A MatMul with its constant on the left is not a site: inspect says so, with the reason."""
    from conftest import Builder

    b = Builder(0)
    y = b.op("MatMul", [b.weight("w", (4, 8)), "x"], name="left")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 2])
    path = save(b.model([x], {"y": (y, [4, 2])}), tmp_path / "left.onnx")
    got = records(to_text(inspect_path(path)))
    assert ("declined", {"node": "left", "reason": "constant operand on the left (W @ x) is not supported"}) in got
    assert dict(got)["sites"]["count"] == "0"


@pytest.mark.parametrize("case", ["missing", "not-onnx", "empty-folder", "bad-report", "bad-placement"])
def test_bad_input_is_one_line(tmp_path, mlp_path, mlp_npz, capsys, case):
    out = tmp_path / "out"
    if case in ("bad-report", "bad-placement"):
        compile_cli(str(mlp_path), "--calib", str(mlp_npz), "--sparsity", "0.4", "-o", str(out))
        (out / ("report.json" if case == "bad-report" else "placement.json")).write_text("{truncated")
        target, expected = out, f"{out / ('report.json' if case == 'bad-report' else 'placement.json')} is not valid JSON"
    elif case == "missing":
        target, expected = tmp_path / "nope.onnx", "model file not found"
    elif case == "not-onnx":
        target = tmp_path / "random.onnx"
        target.write_bytes(np.random.default_rng(0).bytes(256))
        expected = "is not a valid ONNX model"
    else:
        target = tmp_path / "empty"
        target.mkdir()
        expected = "is a folder without model.onnx"
    capsys.readouterr()
    assert cli.main(["inspect", str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("sparsecc: error: ") and expected in captured.err
