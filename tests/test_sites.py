"""Site discovery on Llama-, GPT-2- and BERT-shaped graphs, natural sparsity, heads, and
independence from node names."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import onnx
import pytest
from conftest import Builder, bert_model, gpt2_model, llama_model, to_ir
from onnx import TensorProto, helper

from sparsecc.sites import analyze


def by_weight(analysis):
    return {s.weight: s for s in analysis.sites}


def group_partition(analysis) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for s in analysis.sites:
        groups.setdefault(s.group, set()).add(s.weight)
    return {frozenset(g) for g in groups.values()}


def check(analysis, expected: dict[str, tuple], groups: set[frozenset[str]], attention: int):
    """expected: weight -> (op, in_features, out_features, head, natural)."""
    sites = by_weight(analysis)
    assert set(sites) == set(expected)
    assert len(analysis.sites) == len(expected)
    for weight, (op, k, n, head, natural) in expected.items():
        s = sites[weight]
        assert (s.op, s.in_features, s.out_features, s.head, s.natural) == (op, k, n, head, natural), weight
        assert s.macs_per_token == k * n
        assert s.to_dict()["macs_per_token"] == k * n
        assert s.threshold is None
    assert group_partition(analysis) == groups
    # Sites of one group read one tensor; different groups read different tensors.
    for members in analysis.groups().values():
        assert len({s.group for s in members}) == 1
    assert len(analysis.groups()) == len(groups)
    assert analysis.attention_products == attention
    assert analysis.declined == []
    assert [s.index for s in analysis.sites] == list(range(len(analysis.sites)))
    assert [n.op_type for n in analysis.nodes] == [s.op for s in analysis.sites]


LLAMA = {
    "q_proj.weight": ("MatMul", 16, 16, False, None),
    "k_proj.weight": ("MatMul", 16, 16, False, None),
    "v_proj.weight": ("MatMul", 16, 16, False, None),
    "o_proj.weight": ("MatMul", 16, 16, False, None),
    "gate_proj.weight": ("MatMul", 16, 40, False, None),
    "up_proj.weight": ("MatMul", 16, 40, False, None),
    "down_proj.weight": ("MatMul", 40, 16, False, None),
    "lm_head.weight": ("MatMul", 16, 24, True, None),
}
LLAMA_GROUPS = {frozenset({"q_proj.weight", "k_proj.weight", "v_proj.weight"}), frozenset({"o_proj.weight"}),
                frozenset({"gate_proj.weight", "up_proj.weight"}), frozenset({"down_proj.weight"}),
                frozenset({"lm_head.weight"})}

GPT2 = {
    "c_attn.weight": ("Gemm", 16, 48, False, None),
    "attn_proj.weight_fp16": ("MatMul", 16, 16, False, None),   # through Cast
    "c_fc.weight_q": ("MatMul", 16, 64, False, None),           # through DequantizeLinear
    "mlp_proj.weight": ("Gemm", 64, 16, False, None),           # transB=1
    "wte": ("MatMul", 16, 24, True, None),                      # tied head through Transpose
}
GPT2_GROUPS = {frozenset({w}) for w in GPT2}

BERT = {
    "query.weight": ("MatMul", 16, 16, False, None),
    "key.weight": ("MatMul", 16, 16, False, None),
    "value.weight": ("MatMul", 16, 16, False, None),
    "attn_out.weight": ("MatMul", 16, 16, False, None),
    "fc1.weight": ("MatMul", 16, 48, False, None),
    "fc2.weight": ("MatMul", 48, 16, False, "relu"),
    "pooler.weight": ("Gemm", 16, 16, False, None),
    "classifier.weight": ("Gemm", 16, 3, True, None),
}
BERT_GROUPS = {frozenset({"query.weight", "key.weight", "value.weight"})} | \
    {frozenset({w}) for w in BERT if w not in ("query.weight", "key.weight", "value.weight")}

CASES = {
    "llama": (llama_model, LLAMA, LLAMA_GROUPS),
    "gpt2": (gpt2_model, GPT2, GPT2_GROUPS),
    "bert": (bert_model, BERT, BERT_GROUPS),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_sites(arch):
    build, expected, groups = CASES[arch]
    check(analyze(to_ir(build()).graph), expected, groups, attention=2)


def test_llama_qkv_and_gate_up_share_their_input():
    sites = by_weight(analyze(to_ir(llama_model()).graph))
    assert sites["q_proj.weight"].consumes == sites["k_proj.weight"].consumes == sites["v_proj.weight"].consumes
    assert sites["gate_proj.weight"].source == sites["up_proj.weight"].source
    assert sites["q_proj.weight"].source != sites["o_proj.weight"].source


def _rename_nodes(model: onnx.ModelProto, names) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node, name in zip(model.graph.node, names):
        node.name = name
    return model


def _comparable(analysis):
    return ([{k: v for k, v in dataclasses.asdict(s).items() if k != "node"} for s in analysis.sites],
            analysis.attention_products, [d["reason"] for d in analysis.declined])


@pytest.mark.parametrize("arch", sorted(CASES))
def test_discovery_ignores_node_names(arch):
    build, expected, groups = CASES[arch]
    model = build()
    baseline = _comparable(analyze(to_ir(model).graph))
    rng = random.Random(1234)
    count = len(model.graph.node)
    original = [n.name for n in model.graph.node]
    variants = [
        ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_") for _ in range(12)) for _ in range(count)],
        [""] * count,                      # no names at all
        original[::-1],                    # misleading names: the head is called like the first layer ...
        ["lm_head"] * count,               # ... or every node claims to be the head
    ]
    for names in variants:
        renamed = analyze(to_ir(_rename_nodes(model, names)).graph)
        assert _comparable(renamed) == baseline
        check(renamed, expected, groups, attention=2)


# Natural sparsity -------------------------------------------------------------------------

def _natural_model(tail) -> onnx.ModelProto:
    """x -> MatMul(w1) -> Relu -> tail(builder, relu) -> MatMul(w2) -> Add(x-ish residual) -> y.
    The second MatMul is not a head (its output meets an activation in an Add)."""
    b = Builder(5)
    pre = b.op("MatMul", ["x", b.weight("w1", (8, 12))])
    relu = b.op("Relu", [pre])
    act = tail(b, relu)
    out = b.op("MatMul", [act, b.weight("w2", (12, 8))])
    y = b.op("Add", [out, "x"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    return b.model([x], {"y": (y, ["n", 8])})


def _pow(exponent):
    return lambda b, r: b.op("Pow", [r, b.const(f"exp{exponent}", np.array(exponent, np.float32))])


NATURAL_CASES = {
    "relu": (lambda b, r: r, "relu"),
    "relu-through-layout": (lambda b, r: b.op("Reshape", [b.op("Identity", [r]), b.const("shape", np.array([-1, 12], np.int64))]), "relu"),
    "relu2-pow": (_pow(2.0), "relu2"),
    "relu2-mul": (lambda b, r: b.op("Mul", [r, r]), "relu2"),
    "relu2-mul-through-layout": (lambda b, r: b.op("Mul", [b.op("Identity", [r]), r]), "relu2"),
    "relu2-pow-then-layout": (lambda b, r: b.op("Identity", [_pow(2.0)(b, r)]), "relu2"),
    "pow3-is-not-natural": (_pow(3.0), None),
    "relu-times-other-is-not-natural": (lambda b, r: b.op("Mul", [r, b.op("Sigmoid", [r])]), None),
    "relu-plus-bias-is-not-natural": (lambda b, r: b.op("Add", [r, b.const("bias", np.ones(12, np.float32))]), None),
    "gelu-is-not-natural": (lambda b, r: b.op("Tanh", [r]), None),
}


@pytest.mark.parametrize("case", sorted(NATURAL_CASES))
def test_natural_sparsity(case):
    tail, expected = NATURAL_CASES[case]
    sites = by_weight(analyze(to_ir(_natural_model(tail)).graph))
    assert set(sites) == {"w1", "w2"}
    assert sites["w1"].natural is None
    assert sites["w2"].natural == expected
    assert not sites["w1"].head and not sites["w2"].head


# Heads ------------------------------------------------------------------------------------

def test_head_through_constant_ops_and_not_through_residual():
    """A MatMul whose output reaches the graph output through ops with constant other inputs
    (bias Add, Reshape, Cast, Softcap-like Mul) is a head; one that meets another activation
    on the way is not."""
    b = Builder(6)
    h = b.op("MatMul", ["x", b.weight("w_body", (8, 8))])
    h2 = b.op("Add", [h, "x"])                       # residual: w_body is not a head
    logits = b.op("MatMul", [h2, b.weight("w_head", (8, 5))])
    logits = b.op("Add", [logits, b.const("head_bias", np.zeros(5, np.float32))])
    logits = b.op("Mul", [b.op("Tanh", [logits]), b.const("cap", np.array(30.0, np.float32))])
    logits = b.op("Cast", [b.op("Reshape", [logits, b.const("shape", np.array([-1, 5], np.int64))])], to=TensorProto.FLOAT)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    sites = by_weight(analyze(to_ir(b.model([x], {"logits": (logits, ["n", 5])})).graph))
    assert sites["w_head"].head is True
    assert sites["w_body"].head is False


def test_declined_and_attention_products_are_not_sites():
    b = Builder(7)
    left = b.op("MatMul", [b.weight("w_left", (4, 6)), "x"])           # W @ x: declined
    w3 = b.weight("w3d", (2, 6, 6))
    three = b.op("MatMul", [left, w3])                                   # 3-D weight: declined
    both = b.op("MatMul", [b.weight("c1", (6, 6)), b.weight("c2", (6, 6))])  # constant x constant: declined
    act = b.op("MatMul", [three, b.op("Transpose", [three], perm=[0, 2, 1])])  # activation x activation
    y = b.op("Add", [b.op("ReduceSum", [act], keepdims=0), b.op("ReduceSum", [both], keepdims=0)])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 6])
    analysis = analyze(to_ir(b.model([x], {"y": (y, [])})).graph)
    assert analysis.sites == []
    assert analysis.attention_products == 1
    reasons = [d["reason"] for d in analysis.declined]
    assert len(reasons) == 3
    assert any("left" in r for r in reasons)
    assert any("not a static 2-D" in r for r in reasons)
    assert any("both operands constant" in r for r in reasons)
