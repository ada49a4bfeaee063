"""Step graphs (sparsecc.export, sparsecc.step_models, sparsecc.stepgraph): tiny random-weight
RWKV, Mamba, xLSTM and Llama models exported as single-token ONNX graphs with their state as
explicit inputs and outputs, checked against the transformers model run on the whole
sequence, and site discovery on them.

Sites are identified by their weight's values against the PyTorch modules, never by name.
"""
from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, RwkvConfig, RwkvForCausalLM,
                          xLSTMConfig, xLSTMForCausalLM)

from sparsecc import cli, passes
from sparsecc.backends.ort import OrtBackend
from sparsecc.data import as_feed_source
from sparsecc.metrics import Perplexity
from sparsecc.pass_manager import Context, PassManager
from sparsecc.errors import SparseccError
from sparsecc.export import check_parity, export_step_graph
from sparsecc.model_io import load_model
from sparsecc.runtime import load_session
from sparsecc.site_names import site_labels
from sparsecc.sites import analyze, weight_array
from sparsecc.stepgraph import METADATA_KEY, StepSession, read_spec
from sparsecc.threshold_search import thresholds_by_role

VOCAB = 96
LAYERS = 2


def tiny(arch: str):
    """A 2-layer model with random weights; every parameter jittered so that gates and decays
    are not at their (often zero or uniform) initial values."""
    torch.manual_seed(0)
    if arch == "rwkv":   # rescale_every=1: the eval-time halving of hidden states is exercised too
        lm = RwkvForCausalLM(RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                        attention_hidden_size=32, intermediate_size=64, context_length=64,
                                        rescale_every=1))
    elif arch == "mamba":
        lm = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, state_size=8,
                                          expand=2, conv_kernel=4))
    elif arch == "xlstm":
        lm = xLSTMForCausalLM(xLSTMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_heads=2,
                                          autocast_kernel_dtype="float32", chunk_size=16,
                                          ffn_round_up_to_multiple_of=16))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm.eval()


ARCHS = ("rwkv", "mamba", "xlstm", "llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (PyTorch model, path of its step graph)."""
    out = {}
    for arch in ARCHS:
        lm = tiny(arch)
        path = tmp_path_factory.mktemp(arch) / "model.onnx"
        export_step_graph(lm, path)
        out[arch] = (lm, path)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_runtime_equals_pytorch_token_by_token(exported, arch):
    lm, path = exported[arch]
    tokens = np.random.default_rng(1).integers(0, VOCAB, 24).tolist()
    check = check_parity(lm, path, tokens)
    assert check["tokens"] == 24 and check["max_abs_logit"] > 0.1
    assert check["max_abs_diff"] < 1e-4 * check["max_abs_logit"], check
    # the state matters: the same tokens from a fresh state at every step give other logits
    spec = read_spec(path)
    session = load_session(path)
    carried = session.logits(tokens)
    fresh = np.stack([session.logits([t])[0] for t in tokens])
    # a window fed whole to the session (as calibration and eval feed it) = a hand loop on ONNX
    # Runtime itself carrying new_state.i to state.i
    window = session.run(["logits"], {"input_ids": np.array([tokens], dtype=np.int64)})[0]
    state, by_hand = spec.initial_state(), []
    for t in tokens:
        logits, *new = session.session.run(None, {"input_ids": np.array([[t]], dtype=np.int64), **state})
        by_hand.append(logits.reshape(-1))
        state = {f"state.{i}": value for i, value in enumerate(new)}
    assert window.shape == (1, len(tokens), VOCAB) and np.array_equal(window[0], np.stack(by_hand))
    assert np.array_equal(carried, window[0])
    assert np.abs(carried[1:] - fresh[1:]).max() > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_state_names_pairing_and_shapes(exported, arch):
    lm, path = exported[arch]
    model = load_model(path)
    spec = read_spec(model)
    assert spec.arch == arch
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    n = len(spec.states)
    assert inputs == ["input_ids"] + [f"state.{i}" for i in range(n)]
    assert outputs == ["logits"] + [f"new_state.{i}" for i in range(n)]
    per_layer = {"rwkv": 5, "mamba": 2, "xlstm": 3, "llama": 2}[arch]
    assert n == per_layer * LAYERS
    rows = json.loads(model.metadata_props[METADATA_KEY])["state"]
    assert [(r["input"], r["output"]) for r in rows] == list(zip(inputs[1:], outputs[1:]))
    # one step from the initial state: every new state has its recorded shape (one longer on a growing axis)
    session = load_session(path).session   # the ONNX Runtime session itself, state in and out
    state = spec.initial_state()
    result = session.run(outputs, {"input_ids": np.array([[3]], dtype=np.int64), **state})
    assert result[0].shape == (1, 1, VOCAB)
    for s, before, after in zip(spec.states, state.values(), result[1:]):
        expected = list(before.shape)
        if s.grow_axis is not None:
            expected[s.grow_axis] += 1
        assert list(after.shape) == expected, s.role
    grows = [s.grow_axis is not None for s in spec.states]
    assert all(grows) if arch == "llama" else not any(grows)
    assert spec.state_bytes(64) > spec.state_bytes(0) if arch == "llama" else spec.state_bytes(64) == spec.state_bytes(0)


def _site_modules(model: ir.Model, lm) -> tuple:
    """(analysis, the name of the torch Linear each site computes), matched by weight values
    (a site computes x @ W, a Linear x @ weight.T)."""
    analysis = analyze(model.graph)
    refs = {name: m.weight.detach().numpy().T for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    names = []
    for node in analysis.nodes:
        w = weight_array(node.inputs[1])
        if node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value:
            w = w.T
        matches = [name for name, ref in refs.items() if ref.shape == w.shape and np.array_equal(ref, w)]
        assert len(matches) == 1, (node.name, matches)
        names.append(matches[0])
    return analysis, names


def test_rwkv_sites_natural_relu2_and_paper_order(exported):
    lm, path = exported["rwkv"]
    model = load_model(path)
    analysis, names = _site_modules(model, lm)
    assert not analysis.declined
    per_block = ["attention.key", "attention.receptance", "attention.value", "attention.output",
                 "feed_forward.receptance", "feed_forward.key", "feed_forward.value"]
    assert sorted(names) == sorted([f"rwkv.blocks.{i}.{m}" for i in range(LAYERS) for m in per_block] + ["head"])
    for site, name in zip(analysis.sites, names):
        assert site.head == (name == "head"), name
        assert (site.natural == "relu2") == name.endswith("feed_forward.value"), name
    # insert-thresholds, then the thresholds in graph order = the order sequential-search visits them
    passes.get("insert-thresholds")().run(model, None)
    analysis, names = _site_modules(model, lm)
    by_threshold = {s.threshold: n for s, n in zip(analysis.sites, names) if s.threshold}
    searched, natural = thresholds_by_role(model)
    order = [by_threshold[th.node.name] for th in searched]
    paper = ["attention.key", "attention.receptance", "attention.value", "attention.output",
             "feed_forward.receptance", "feed_forward.key"]
    assert order == [f"rwkv.blocks.{i}.{m}" for i in range(LAYERS) for m in paper]
    assert [names[s.index] for s in natural] == [f"rwkv.blocks.{i}.feed_forward.value" for i in range(LAYERS)]


@pytest.mark.parametrize("arch, per_layer, groups_per_layer", [
    ("mamba", ["mixer.in_proj", "mixer.x_proj", "mixer.dt_proj", "mixer.out_proj"], 4),
    ("xlstm", ["mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact",
               "mlstm_layer.igate_preact", "mlstm_layer.fgate_preact", "mlstm_layer.out_proj",
               "ffn.proj_up_gate", "ffn.proj_up", "ffn.proj_down"], 4),
    ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], 4),
])
def test_sites_found_by_structure(exported, arch, per_layer, groups_per_layer):
    lm, path = exported[arch]
    analysis, names = _site_modules(load_model(path), lm)
    layers = {"mamba": "backbone.layers", "xlstm": "backbone.blocks", "llama": "model.layers"}[arch]
    head = "lm_head"
    assert not analysis.declined
    assert sorted(names) == sorted([f"{layers}.{i}.{m}" for i in range(LAYERS) for m in per_layer] + [head])
    assert [s.head for s in analysis.sites] == [n == head for n in names]
    assert not any(s.natural for s in analysis.sites)
    body_groups = {s.group for s in analysis.sites if not s.head}
    assert len(body_groups) == groups_per_layer * LAYERS
    # attention-like products between activations are not sites (Mamba's C readout, mLSTM, attention)
    assert analysis.attention_products == {"mamba": 1, "xlstm": 3, "llama": 2}[arch] * LAYERS


# torch module (after the layer index) -> the name sparsecc.site_names gives its site, from
# structure alone: attention and MLP roles where the data flow shows them, `o` for a recurrent
# mixer's output, else the site's position in its layer
ROLES = {
    "rwkv": {"attention.key": "site 0", "attention.receptance": "site 1", "attention.value": "site 2",
             "attention.output": "o", "feed_forward.receptance": "site 4", "feed_forward.key": "up",
             "feed_forward.value": "down"},
    "mamba": {"mixer.in_proj": "site 0", "mixer.x_proj": "site 1", "mixer.dt_proj": "site 2", "mixer.out_proj": "o"},
    "xlstm": {"mlstm_layer.q": "site 0", "mlstm_layer.k": "site 1", "mlstm_layer.v": "site 2",
              "mlstm_layer.ogate_preact": "site 3", "mlstm_layer.igate_preact": "site 4",
              "mlstm_layer.fgate_preact": "site 5", "mlstm_layer.out_proj": "o", "ffn.proj_up_gate": "gate",
              "ffn.proj_up": "up", "ffn.proj_down": "down"},
    "llama": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
              "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_sites_are_named_by_layer_and_role(exported, arch):
    lm, path = exported[arch]
    model = load_model(path)
    analysis, modules = _site_modules(model, lm)
    labels = site_labels(model.graph, analysis)
    expected = []
    for module in modules:
        m = re.search(r"\.(\d+)\.(.+)$", module)
        expected.append(f"layer {m.group(1)} {ROLES[arch][m.group(2)]}" if m else "head")
    assert [labels[s.index] for s in analysis.sites] == expected


def test_export_is_byte_identical(exported, tmp_path):
    lm, path = exported["rwkv"]
    again = tmp_path / "model.onnx"
    export_step_graph(tiny("rwkv"), again)
    assert again.read_bytes() == path.read_bytes()


def test_any_model_with_a_dynamic_cache_gets_the_kv_decode_step():
    """GPT-2 (no Llama wrapper of its own): per layer a key and a value cache whose shape is the
    one the model itself caches, [1, heads, past, head_dim]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparsecc.step_models import KvCacheDecodeStep, step_module

    step = step_module(GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2)))
    assert isinstance(step, KvCacheDecodeStep) and step.spec.arch == "gpt2"
    assert [(s.role, s.shape, s.grow_axis) for s in step.spec.states] == [
        ("layer 0 key cache", (1, 2, "past", 4), 2), ("layer 0 value cache", (1, 2, "past", 4), 2)]


def test_read_spec_rejects_a_full_sequence_graph():
    from conftest import SAMPLE_MODEL

    with pytest.raises(SparseccError, match="not a step graph"):
        read_spec(SAMPLE_MODEL)


def test_cli_export_folder(tmp_path, capsys):
    lm = tiny("mamba")
    lm.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    assert cli.main(["export", str(tmp_path / "src"), "-o", str(out), "--check-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "mamba" and report["check"]["ok"] and report["check"]["tokens"] == 6
    assert not report["state_grows"] and report["state_bytes"] == read_spec(out / "model.onnx").state_bytes(0)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]


def test_cli_export_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 2
    assert "neither a transformers model folder" in capsys.readouterr().err
    lm = tiny("llama")
    lm.save_pretrained(tmp_path / "src")
    (tmp_path / "text").mkdir()
    assert cli.main(["export", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--check-text",
                     str(tmp_path / "text"), "--check-tokens", "4"]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def windows(n=3, length=20, seed=2):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, length)).astype(np.int64)} for _ in range(n)]


@pytest.mark.parametrize("arch", ["rwkv", "mamba"])
def test_eval_runs_a_step_graph_token_by_token(exported, arch):
    """The ort backend fed windows of tokens gives a step graph the PyTorch model's perplexity."""
    lm, path = exported[arch]
    assert isinstance(load_session(path), StepSession)
    data = windows()
    result = OrtBackend().evaluate(load_model(path), as_feed_source(data))
    reference = Perplexity()
    with torch.no_grad():
        for feed in data:
            ids = torch.from_numpy(feed["input_ids"])
            reference.add(lm(input_ids=ids, use_cache=False).logits.numpy(), feed["input_ids"])
    assert result["tokens"] == reference.tokens == 3 * 19
    assert result["perplexity"] == pytest.approx(reference.value, rel=1e-4)
    natural = [r["sparsity"] for r in result["sites"] if r["natural"]]
    assert len(natural) == (LAYERS if arch == "rwkv" else 0) and all(0.2 < s < 0.9 for s in natural)


def test_calibration_and_sequential_search_on_a_step_graph(exported):
    """Thresholds calibrated on every token step meet their target when measured step by step;
    the sequential search runs on the step graph and keeps the loss within its allowance."""
    lm, path = exported["rwkv"]
    data = as_feed_source(windows(4))
    model = load_model(path)
    PassManager([passes.get("insert-thresholds")(), passes.get("calibrate-thresholds")(sparsity=0.5, refine=1)]).run(
        model, Context(calibration=data))
    measured = OrtBackend().evaluate(model, data)["macs"]["body"]["sparsity"]
    assert measured == pytest.approx(0.5, abs=0.02)

    model = load_model(path)
    reports = PassManager([passes.get("insert-thresholds")(),
                           passes.get("sequential-search")(loss_inc=1.02, windows=2, refine=0)]).run(
        model, Context(calibration=data))
    details = reports[-1].details
    assert details["calibrated_model_sparsity"] > 0.1 and details["loss"]["kind"] == "cross-entropy"
    for step in details["history"]:   # every accepted threshold within its budget
        assert step["loss"] <= step["budget"]
    assert details["loss"]["searched"] <= details["loss"]["dense"] * 1.02 ** details["search"]["thresholds"]


@pytest.mark.parametrize("search", ["greedy-blocks", "finetune-bands"])
def test_window_only_searches_decline_step_graphs(exported, search):
    model = load_model(exported["rwkv"][1])
    passes.get("insert-thresholds")().run(model, None)
    with pytest.raises(SparseccError, match=f"{search} does not run on step graphs .* use sequential-search"):
        PassManager([passes.get(search)()]).check(model, Context(calibration=as_feed_source(windows(1))))
