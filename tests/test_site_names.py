"""Site, threshold and group names (sparsecc.site_names): layer and role found from graph
structure. The expected names come from outside the structure: the tiny models' weights are
named after their role in tests/conftest.py, and the sample's weights carry the PyTorch
parameter they were exported from (onnxscript's `folded_from` metadata). Node and tensor
names are scrambled to show they are never read."""
from __future__ import annotations

import copy
import json
import random
import re

import onnx
import pytest
from conftest import (SAMPLE_MODEL, bert_model, gpt2_model, llama_model, mlp_feeds, mlp_model, save, save_npz,
                      to_ir)

from sparsecc import cli, model_io
from sparsecc.data import as_feed_source
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.site_names import Name, label, node_layers, site_labels, threshold_labels
from sparsecc.sites import analyze

# conftest model -> {weight initializer: expected label}
EXPECTED = {
    "llama": (llama_model, {"q_proj.weight": "q", "k_proj.weight": "k", "v_proj.weight": "v", "o_proj.weight": "o",
                            "gate_proj.weight": "gate", "up_proj.weight": "up", "down_proj.weight": "down",
                            "lm_head.weight": "head"}),
    "gpt2": (gpt2_model, {"c_attn.weight": "qkv", "attn_proj.weight_fp16": "o", "c_fc.weight_q": "up",
                          "mlp_proj.weight": "down", "wte": "head"}),
    # the pooler feeds only the classifier head: no role of its own, its position instead
    "bert": (bert_model, {"query.weight": "q", "key.weight": "k", "value.weight": "v", "attn_out.weight": "o",
                          "fc1.weight": "up", "fc2.weight": "down", "pooler.weight": "site 6", "classifier.weight": "head"}),
    # two residual MLP blocks and no repeated layer: the second block's roles are numbered
    "mlp": (mlp_model, {"w_gate": "gate", "w_up": "up", "w_down": "down", "w_fc": "up #2", "w_out": "down #2",
                        "w_head": "head"}),
}


def _by_weight(model) -> dict[str, str]:
    analysis = analyze(model.graph)
    labels = site_labels(model.graph, analysis)
    return {s.weight: labels[s.index] for s in analysis.sites}


def _scrambled(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """Every node and every computed tensor renamed at random (graph inputs, outputs and weights kept)."""
    model = copy.deepcopy(model)
    rng = random.Random(seed)
    keep = {v.name for v in model.graph.input} | {v.name for v in model.graph.output} | {
        t.name for t in model.graph.initializer}
    renamed = {}
    for node in model.graph.node:
        node.name = f"n{rng.randrange(10**9)}"
        for i, name in enumerate(node.output):
            if name not in keep:
                renamed[name] = f"t{rng.randrange(10**9)}"
                node.output[i] = renamed[name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    return model


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_sites_of_the_tiny_models_are_named_by_role_whatever_the_node_names(arch):
    build, expected = EXPECTED[arch]
    assert _by_weight(to_ir(build())) == expected
    for seed in (1, 2):
        assert _by_weight(to_ir(_scrambled(build(), seed))) == expected


def _provenance(model) -> dict[str, str]:
    """weight -> the name its PyTorch parameter gives it: `layer 3 q` from `layers.3.self_attn.q_proj`."""
    out = {}
    for name, value in model.graph.initializers.items():
        source = value.metadata_props.get("pkg.onnxscript.optimizer.folded_from", name)   # else its own name
        if m := re.search(r"layers\.(\d+)\.\w+\.(\w+)_proj", source):
            out[name] = f"layer {m.group(1)} {m.group(2)}"
        elif "lm_head" in source or "embed_tokens" in source:
            out[name] = "head"
    return out


def test_sample_sites_are_named_as_the_pytorch_modules_they_came_from():
    model = model_io.load_model(SAMPLE_MODEL)
    named, expected = _by_weight(model), _provenance(model)
    assert len(named) == 29 and set(named) == set(expected)
    assert named == expected
    assert [named[w] for w in list(named)[:8]] == ["layer 0 q", "layer 0 k", "layer 0 v", "layer 0 o", "layer 0 gate",
                                                   "layer 0 up", "layer 0 down", "layer 1 q"]


def test_every_node_of_the_sample_is_in_the_layer_its_exporter_scoped_it_in():
    """node_layers against the PyTorch module scope the exporter wrote (`layers.N`) for every node
    whose value depends on the tokens; the few the exporter scoped into layer 0 although every
    layer reads them (the causal mask) are shape computations. Names are not read: scrambled
    names give the same layers."""
    proto = onnx.load(str(SAMPLE_MODEL))
    model = to_ir(proto)
    layers = node_layers(model.graph)
    scoped = {}
    for node in model.graph:
        m = re.search(r"layers\.(\d+)\b", node.metadata_props.get("namespace", ""))
        scoped[node.name] = int(m.group(1)) if m else None
    from sparsecc.backends.seneca.simulator import data_dependent
    live = data_dependent(model.graph)[0]
    assert {n for n in scoped if n in live and layers[n] != scoped[n]} == set()
    assert sorted(set(layers.values()) - {None}) == [0, 1, 2, 3]
    scrambled = to_ir(_scrambled(proto, 3))
    assert [layers[n.name] for n in model.graph] == [k for k in node_layers(scrambled.graph).values()]


def test_inserted_thresholds_are_in_the_layer_of_the_sites_they_feed():
    model = model_io.load_model(SAMPLE_MODEL)
    PassManager([get("insert-thresholds")()]).run(model, Context())
    layers, analysis = node_layers(model.graph), analyze(model.graph)
    site_layer = {s.threshold: layers[s.node] for s in analysis.sites if s.threshold}
    assert len(site_layer) == 16 and all(layers[t] == k for t, k in site_layer.items())


def test_labels_join_sites_and_layers():
    qkv = [Name(layer, role) for layer in range(4) for role in ("v", "q", "k")]
    assert label(qkv) == "layers 0-3 q/k/v"                 # roles in their layer's order, not as given
    assert label(qkv[:3]) == "layer 0 q/k/v"
    assert label([Name(0, "o"), Name(2, "o"), Name(3, "o")]) == "layers 0,2-3 o"
    assert label([Name(1, "site 2"), Name(1, "site 0"), Name(1, "o")]) == "layer 1 o/site 0/2"
    assert label([Name(None, "head")]) == "head" and label([Name(None, "gate"), Name(None, "up")]) == "gate/up"


@pytest.mark.parametrize("per_consumer", [False, True])
def test_thresholds_are_named_by_the_sites_they_feed(per_consumer):
    model = model_io.load_model(SAMPLE_MODEL)
    PassManager([get("insert-thresholds")(per_consumer=per_consumer)]).run(model, Context())
    labels = list(threshold_labels(model.graph).values())
    roles = ["q", "k", "v", "o", "gate", "up", "down"] if per_consumer else ["q/k/v", "o", "gate/up", "down"]
    assert labels == [f"layer {layer} {role}" for layer in range(4) for role in roles]
    # thresholds in place: the sites keep their names
    assert _by_weight(model) == _provenance(model)


def test_names_survive_quantization_and_compensation():
    model = to_ir(mlp_model())
    before = _by_weight(model)
    data = as_feed_source(mlp_feeds(4, rows=16))
    PassManager([get("quantize-weights")(bits=8), get("insert-thresholds")(), get("compensate-lowrank")(rank=2),
                 get("calibrate-thresholds")(sparsity=0.4), get("quantize-activations")()]).run(
        model, Context(calibration=data))
    analysis = analyze(model.graph)
    labels = site_labels(model.graph, analysis)
    named = {s.weight: labels[s.index] for s in analysis.sites if s.compensates is None}
    assert sorted(named.values()) == sorted(before.values())
    factors = sorted(labels[s.index] for s in analysis.sites if s.compensates is not None)
    assert factors == sorted(f"{site} factor {k}" for site in ("gate", "up", "down", "up #2") for k in (1, 2))


def test_one_label_per_site_in_every_report_and_inspect(tmp_path):
    """compile's report.json/report.md/report.html, inspect and eval name each site alike, never by node."""
    model = save(_scrambled(mlp_model(), 3), tmp_path / "mlp.onnx")
    data = save_npz(mlp_feeds(4, rows=16), tmp_path / "calib.npz")
    out = tmp_path / "out"
    assert cli.main(["-q", "compile", str(model), "--calib", str(data), "--sparsity", "0.4", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    expected = EXPECTED["mlp"][1]
    assert {s["weight"]: s["label"] for s in report["sites"]} == expected
    calibrated = report["passes"][2]["details"]
    assert [r["label"] for r in calibrated["thresholds"]] == ["gate/up", "down", "up #2"]
    assert [r["label"] for r in calibrated["natural"]] == ["down #2"]   # reads a ReLU
    assert cli.main(["-q", "eval", str(out / "model.onnx"), "--ppl", str(data), "-o", str(tmp_path / "ev")]) == 0
    measured = json.loads((tmp_path / "ev" / "report.json").read_text())["result"]["sites"]
    assert [s["label"] for s in measured] == [s["label"] for s in report["sites"]]
    from sparsecc.inspection import inspect_path, to_text

    text = to_text(inspect_path(out))
    shown = re.findall(r'^site index=\d+ label=("[^"]+"|\S+)', text, re.M)
    assert [json.loads(v) if v.startswith('"') else v for v in shown] == [s["label"] for s in report["sites"]]
    for folder in (out, tmp_path / "ev"):
        md, page = (folder / "report.md").read_text(), (folder / "report.html").read_text()
        assert "| gate/up |" in md or "| gate |" in md
        assert ">gate<" in page and ">down #2<" in page   # tick labels of the site bars
        nodes = [s["site"] for s in measured]
        assert not any(f">{n}<" in page for n in nodes)   # the page never names a node
