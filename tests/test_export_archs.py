"""`sparsecc export` on the architectures people use: each a tiny random transformers model
built here (no download), saved as a transformers folder with the sample tokenizer, exported
by the CLI as a window graph and a decode step graph (the export itself checks ONNX Runtime
against PyTorch and writes nothing otherwise), then, for each graph: sites, groups and head
found from structure (matched to the torch modules by weight values, named by
sparsecc.site_names), compiled at 50% on the sample text, evaluated against the uncompiled
model, compiled for seneca and simulated for a few tokens with ORT's threshold decisions.
The recurrent models are exported as step graphs; their window graph is refused in one line.

`python -m pytest -q -s -m '' tests/test_export_archs.py` runs every architecture and prints the
table of what each did; the default run takes GPT-2 only (see IN_EVERY_RUN).
"""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import transformers as T

import sparsecc
from conftest import SAMPLE, WIKITEXT
from sparsecc import cli
from sparsecc import passes as registry
from sparsecc.backends.seneca.simulation import simulate
from sparsecc.data import as_feed_source
from sparsecc.model_io import load_model

from sparsecc.pipeline import default_pipeline
from sparsecc.site_names import site_labels
from sparsecc.sites import analyze, weight_array
from test_seneca_steps import target_file

VOCAB = 2048          # the sample tokenizer's
LAYERS = 2
SEQ, WINDOWS = 32, 4  # calibration and evaluation windows of the sample text
SIM_TOKENS = 6


def _llama_like(**extra):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)


GATED = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}
# name -> (model class, config, torch module under the layer -> the role site_names must give it)
ATTENTION = {
    "llama": (T.LlamaForCausalLM, lambda: T.LlamaConfig(**_llama_like()), GATED),
    "qwen2": (T.Qwen2ForCausalLM, lambda: T.Qwen2Config(**_llama_like()), GATED),
    "qwen3": (T.Qwen3ForCausalLM, lambda: T.Qwen3Config(**_llama_like(head_dim=8)), GATED),   # q/k norms
    # GeGLU, sandwich norms, soft-capping of scores and logits, sliding-window layers shorter than the text
    "gemma2": (T.Gemma2ForCausalLM, lambda: T.Gemma2Config(**_llama_like(head_dim=8, sliding_window=8,
                                                                         final_logit_softcapping=30.0,
                                                                         attn_logit_softcapping=50.0)), GATED),
    "gemma3": (T.Gemma3ForCausalLM, lambda: T.Gemma3TextConfig(**_llama_like(head_dim=8, sliding_window=8)), GATED),
    "phi3": (T.Phi3ForCausalLM, lambda: T.Phi3Config(**_llama_like(pad_token_id=0)),
             {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "up", "down_proj": "down"}),
    "mistral": (T.MistralForCausalLM, lambda: T.MistralConfig(**_llama_like(sliding_window=None)), GATED),
    "gpt2": (T.GPT2LMHeadModel, lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=256),
             {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}),
    "opt": (T.OPTForCausalLM, lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS,
                                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
            {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o", "fc1": "up", "fc2": "down"}),
    "gpt_neox": (T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=LAYERS, num_attention_heads=4,
                                                              max_position_embeddings=256),
                 {"attention.query_key_value": "qkv", "attention.dense": "o", "mlp.dense_h_to_4h": "up",
                  "mlp.dense_4h_to_h": "down"}),
}
RECURRENT = ("rwkv", "mamba", "xlstm")
GRAPHS = ("window", "step")
ROWS: dict[str, dict] = {}   # what the table prints


RECURRENT_CONFIGS = {   # as test_step_graphs.tiny, with the sample tokenizer's vocabulary
    "rwkv": lambda: T.RwkvForCausalLM(T.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                                   attention_hidden_size=32, intermediate_size=64, context_length=64,
                                                   rescale_every=1)),
    "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS,
                                                      state_size=8, expand=2, conv_kernel=4)),
    "xlstm": lambda: T.xLSTMForCausalLM(T.xLSTMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS,
                                                      num_heads=2, autocast_kernel_dtype="float32", chunk_size=16,
                                                      ffn_round_up_to_multiple_of=16)),
}


def tiny(arch: str):
    """A 2-layer random model, every parameter jittered off its initial value (norm scales, biases)."""
    torch.manual_seed(0)
    if arch in RECURRENT_CONFIGS:
        lm = RECURRENT_CONFIGS[arch]()
    else:
        cls, config, _ = ATTENTION[arch]
        lm = cls(config())
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return lm.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (PyTorch model, {graph: export folder}), each exported once, when a test first
    asks for it; recurrent ones: step only."""
    root = tmp_path_factory.mktemp("export")
    check_text = str(WIKITEXT / "test.txt")
    done = {}

    def export(arch: str):
        if arch in done:
            return done[arch]
        lm = tiny(arch)
        src = root / arch / "src"
        lm.save_pretrained(src)
        shutil.copy(SAMPLE / "tokenizer.json", src / "tokenizer.json")
        folders = {}
        for graph in (("step",) if arch in RECURRENT else GRAPHS):
            folder = root / arch / graph
            assert cli.main(["export", str(src), "--graph", graph, "-o", str(folder), "--check-text", check_text,
                             "--check-tokens", "12", "-q", "--json"]) == 0
            report = json.loads((folder / "report.json").read_text())
            assert report["graph"] == graph and report["check"]["ok"] and report["check"]["tokens"] == 12
            ROWS.setdefault(f"{arch} {graph}", {})["parity"] = report["check"]["max_abs_diff"] / report["check"]["max_abs_logit"]
            folders[graph] = folder
        done[arch] = (lm, folders)
        return done[arch]
    return export


# The default run (CI) takes GPT-2, the architecture least like the Llama sample (Conv1D
# products, one fused qkv, learned positions, GELU); the whole matrix is marked
# 'architectures' (about 15 minutes on 2 cores): python -m pytest -q -m '' tests/test_export_archs.py
IN_EVERY_RUN = ("gpt2",)


def _case(arch: str, *rest):
    marks = () if arch in IN_EVERY_RUN else (pytest.mark.architectures,)
    return pytest.param(arch, *rest, marks=marks, id="-".join((arch, *rest)))


def cases(attention_only: bool = False):
    return [_case(a, g) for a in ATTENTION for g in GRAPHS] + \
        ([] if attention_only else [_case(a, "step") for a in RECURRENT])


def _linear_weights(lm) -> dict[str, np.ndarray]:
    """torch module name -> the weight W its product computes as x @ W (Linear: weight.T; GPT-2's Conv1D: weight)."""
    from transformers.pytorch_utils import Conv1D

    refs = {}
    for name, m in lm.named_modules():
        if isinstance(m, torch.nn.Linear):
            refs[name] = m.weight.detach().numpy().T
        elif isinstance(m, Conv1D):
            refs[name] = m.weight.detach().numpy()
    return refs


def _site_modules(analysis, lm) -> list[str]:
    refs = _linear_weights(lm)
    names = []
    for node in analysis.nodes:
        w = weight_array(node.inputs[1])
        if node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value:
            w = w.T
        matches = [name for name, ref in refs.items() if ref.shape == w.shape and np.array_equal(ref, w)]
        assert len(matches) == 1, (node.name, matches)
        names.append(matches[0])
    return names


@pytest.mark.parametrize("arch, graph", cases(attention_only=True))
def test_sites_groups_and_head_from_structure(exported, arch, graph):
    lm, folders = exported(arch)
    model = load_model(folders[graph] / "model.onnx")
    analysis = analyze(model.graph)
    modules = _site_modules(analysis, lm)
    roles = ATTENTION[arch][2]
    expected = []
    for module in modules:
        m = re.search(r"\.(\d+)\.(.+)$", module)
        role = next((r for k, r in roles.items() if m and (m.group(2) == k or m.group(2).endswith("." + k))), None)
        expected.append(f"layer {m.group(1)} {role}" if m else "head")
    labels = site_labels(model.graph, analysis)
    found = [labels[s.index] for s in analysis.sites]
    assert sorted(expected) == sorted([f"layer {i} {r}" for i in range(LAYERS) for r in roles.values()] + ["head"])
    assert found == expected
    assert [s.head for s in analysis.sites] == [e == "head" for e in expected]
    # groups: sites share one exactly when they read one tensor: q/k/v, gate/up of one layer
    group_of = {}
    for site, name in zip(analysis.sites, expected):
        layer_role = name.rsplit(" ", 1)
        key = (layer_role[0], "qkv" if layer_role[-1] in ("q", "k", "v") else "gate/up" if layer_role[-1] in ("gate", "up")
               else layer_role[-1])
        group_of.setdefault(key, set()).add(site.group)
    assert all(len(g) == 1 for g in group_of.values())
    assert len({s.group for s in analysis.sites}) == len(group_of)
    # OPT's fc2 reads a ReLU: naturally sparse, nothing else is
    assert [s.natural is not None and s.natural != "" for s in analysis.sites] == \
        [arch == "opt" and e.endswith("down") for e in expected]
    ROWS[f"{arch} {graph}"]["sites"] = f"{sum(f == e for f, e in zip(found, expected))}/{len(expected)}"


def _data(tokenizer, which: str):
    return sparsecc.data_source(str(WIKITEXT / which), tokenizer=str(tokenizer), windows=WINDOWS, seq_len=SEQ)


@pytest.mark.parametrize("arch, graph", cases())
def test_compile_eval_and_simulate(exported, tmp_path, arch, graph):
    """50% body sparsity is met on the evaluation text; perplexity against the uncompiled
    graph; the seneca simulator with ORT's threshold decisions gives ORT's logits."""
    folder = exported(arch)[1][graph]
    model = folder / "model.onnx"
    compiled = sparsecc.compile_model(model, default_pipeline(sparsity=0.5), _data(folder, "valid.txt"),
                                      out=tmp_path / "c50")
    assert compiled.report["passes"]
    result = sparsecc.evaluate(tmp_path / "c50" / "model.onnx", _data(folder, "test.txt"), reference=model)["result"]
    assert result["macs"]["body"]["sparsity"] == pytest.approx(0.5, abs=0.08)
    ppl, dense = result["perplexity"], result["reference_perplexity"]
    assert math.isfinite(ppl) and math.isfinite(dense) and ppl != dense
    row = ROWS[f"{arch} {graph}"]
    row["compile"] = result["macs"]["body"]["sparsity"]
    row["dppl"] = (ppl, dense)

    target = target_file(tmp_path, data_memory=65536)
    passes = default_pipeline(sparsity=0.5) + [registry.get("partition")(target=target, max_context=16)]
    sparsecc.compile_model(model, passes, _data(folder, "valid.txt"), out=tmp_path / "seneca", target="seneca")
    feed = {"input_ids": _data(folder, "test.txt").rows[:1, :SIM_TOKENS].astype(np.int64)}
    report = simulate(tmp_path / "seneca", as_feed_source([feed]))
    pinned = report["vs_ort"]["with_ort_decisions"]
    peak = report["vs_ort"]["max_abs_logit"]
    assert pinned["threshold_decisions"] > 0
    assert pinned["max_abs_logit_diff"] <= 0.01 * peak, pinned
    assert pinned["argmax_agreement"] >= 0.8, pinned
    row["simulate"] = (pinned["argmax_agreement"], pinned["max_abs_logit_diff"] / peak)


@pytest.mark.parametrize("arch", [_case(a) for a in RECURRENT])
def test_recurrent_window_graph_is_refused_in_one_line(exported, tmp_path, capsys, arch):
    lm, folders = exported(arch)
    src = folders["step"].parent / "src"
    assert cli.main(["export", str(src), "--graph", "window", "-o", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sparsecc: error: torch.onnx.export fixes the window length") and len(err[-1]) < 300
    assert err[-1].endswith("export it with --graph step") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "w").exists()
    ROWS.setdefault(f"{arch} window", {})["refused"] = "fixed length: --graph step"


@pytest.mark.parametrize("config, what", [
    (lambda: T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
     "is an encoder-only (masked LM) model (bert)"),
    (lambda: T.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8),
     "is an encoder-decoder (seq2seq) model (t5)"),
    (lambda: T.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
     "(vit) has no causal-LM head in transformers"),
])
def test_what_cannot_be_exported_is_refused_with_the_alternative(tmp_path, capsys, config, what):
    config().save_pretrained(tmp_path / "src")   # a config is all the refusal reads
    assert cli.main(["export", str(tmp_path / "src"), "--graph", "window", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("sparsecc: error:")] == err[-1:], err   # one line, no traceback
    assert what in err[-1] and "export" in err[-1].split(";", 1)[1], err
    assert not (tmp_path / "out").exists()


def test_zz_table():
    """Prints the table of the cases this run took (with -s); every case has every column."""
    lines = ["| architecture | graph | sites found/expected | compile 50% (measured) | ppl (dense -> 50%) | "
             "seneca simulate (argmax agreement, max logit diff / peak, ORT decisions) | parity with PyTorch (max diff / peak) |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(ROWS):
        row = ROWS[key]
        arch, graph = key.split()
        if "refused" in row:
            lines.append(f"| {arch} | {graph} | refused ({row['refused']}) | | | | |")
            continue
        assert {"compile", "dppl", "simulate", "parity"} <= set(row), (key, row)
        sites = row.get("sites", "see test_step_graphs")
        ppl, dense = row["dppl"]
        lines.append(f"| {arch} | {graph} | {sites} | {row['compile']:.3f} | {dense:.1f} -> {ppl:.1f} "
                     f"({(ppl - dense) / dense:+.1%}) | {row['simulate'][0]:.2f}, {row['simulate'][1]:.1e} | "
                     f"{row['parity']:.1e} |")
    print("\n" + "\n".join(lines))
