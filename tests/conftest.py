"""Shared helpers: tiny models built inline with onnx.helper, and paths to the bundled sample.

Every builder returns an `onnx.ModelProto` (opset 18, IR version 10) whose weights are
initializers named after their role, so tests identify sites by weight name, never by node
name. `Builder` names nodes after their role too ("q_proj", ...), which the node-name
independence test then scrambles.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "tiny_llama"
SAMPLE_MODEL = SAMPLE / "model.onnx"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
VALID_TXT = WIKITEXT / "valid.txt"
TEST_TXT = WIKITEXT / "test.txt"
OPSET = 18
IR_VERSION = 10
TOKENIZER_VOCAB = 2048  # samples/tiny_llama/tokenizer.json


class Builder:
    """A tiny graph under construction: nodes, initializers, fresh tensor names."""

    def __init__(self, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self._count = 0

    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> str:
        scale = 1.0 / np.sqrt(shape[0] if len(shape) > 1 else 1)
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(dtype))

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name or self.fresh(op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: dict[str, tuple], opset: int = OPSET,
              elem=TensorProto.FLOAT) -> onnx.ModelProto:
        """`outputs`: graph output name -> (tensor, shape); the tensor is renamed so graph
        outputs have stable names."""
        out_infos = []
        for name, (tensor, shape) in outputs.items():
            for node in self.nodes:
                for i, o in enumerate(node.output):
                    if o == tensor:
                        node.output[i] = name
                for i, o in enumerate(node.input):
                    if o == tensor:
                        node.input[i] = name
            out_infos.append(helper.make_tensor_value_info(name, elem, shape))
        graph = helper.make_graph(self.nodes, "tiny", inputs, out_infos, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = IR_VERSION
        return model

    # Common blocks -------------------------------------------------------------------------
    def rmsnorm(self, x: str, dim: int, prefix: str) -> str:
        two = self.const(f"{prefix}.two", np.array(2.0, np.float32))
        axes = self.const(f"{prefix}.axes", np.array([-1], np.int64))
        eps = self.const(f"{prefix}.eps", np.array(1e-5, np.float32))
        g = self.const(f"{prefix}.weight", (1 + 0.1 * self.rng.standard_normal(dim)).astype(np.float32))
        ms = self.op("ReduceMean", [self.op("Pow", [x, two]), axes], keepdims=1)
        r = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, eps])])])
        return self.op("Mul", [self.op("Mul", [x, r]), g])

    def layernorm(self, x: str, dim: int, prefix: str) -> str:
        g = self.const(f"{prefix}.weight", np.ones(dim, np.float32))
        b = self.const(f"{prefix}.bias", np.zeros(dim, np.float32))
        return self.op("LayerNormalization", [x, g, b], axis=-1, epsilon=1e-5)

    def linear_t(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """x @ W.T with W [out, in] stored as an initializer (the PyTorch export layout)."""
        w = self.weight(f"{name}.weight", (n_out, n_in))
        return self.op("MatMul", [x, self.op("Transpose", [w], perm=[1, 0])], name=name)

    def linear_b(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """x @ W + b, W [in, out]."""
        w = self.weight(f"{name}.weight", (n_in, n_out))
        b = self.const(f"{name}.bias", np.zeros(n_out, np.float32))
        return self.op("Add", [self.op("MatMul", [x, w], name=name), b])


def llama_model(dim: int = 16, heads: int = 2, ffn: int = 40, vocab: int = 24, seed: int = 0) -> onnx.ModelProto:
    """One Llama decoder block with an embedding and an LM head: input_ids [1, S] -> logits [1, S, vocab]."""
    b = Builder(seed)
    dh = dim // heads
    emb = b.weight("embed.weight", (vocab, dim))
    x = b.op("Gather", [emb, "input_ids"], name="embed")
    h = b.rmsnorm(x, dim, "norm1")
    q, k, v = (b.linear_t(h, n, dim, dim) for n in ("q_proj", "k_proj", "v_proj"))
    split = b.const("heads_shape", np.array([1, -1, heads, dh], np.int64))
    q4 = b.op("Transpose", [b.op("Reshape", [q, split])], perm=[0, 2, 1, 3])
    kt = b.op("Transpose", [b.op("Reshape", [k, split])], perm=[0, 2, 3, 1])
    v4 = b.op("Transpose", [b.op("Reshape", [v, split])], perm=[0, 2, 1, 3])
    scale = b.const("attn_scale", np.array(1 / np.sqrt(dh), np.float32))
    scores = b.op("Mul", [b.op("MatMul", [q4, kt], name="attn_scores"), scale])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v4], name="attn_values")
    merged = b.op("Reshape", [b.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                              b.const("merge_shape", np.array([1, -1, dim], np.int64))])
    x2 = b.op("Add", [x, b.linear_t(merged, "o_proj", dim, dim)])
    h2 = b.rmsnorm(x2, dim, "norm2")
    gate = b.linear_t(h2, "gate_proj", dim, ffn)
    up = b.linear_t(h2, "up_proj", dim, ffn)
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
    x3 = b.op("Add", [x2, b.linear_t(act, "down_proj", ffn, dim)])
    h3 = b.rmsnorm(x3, dim, "norm_f")
    logits = b.op("MatMul", [h3, b.weight("lm_head.weight", (dim, vocab))], name="lm_head")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])
    return b.model([ids], {"logits": (logits, [1, "seq", vocab])})


def gpt2_model(dim: int = 16, vocab: int = 24, seed: int = 1) -> onnx.ModelProto:
    """One GPT-2 block on x [S, dim]: Gemm fused qkv + Split, proj weight through Cast (fp16
    storage), fc weight through DequantizeLinear (int8), GELU (Erf), Gemm transB=1 proj,
    LM head tied to the token embedding through a Transpose."""
    b = Builder(seed)
    ln1 = b.layernorm("x", dim, "ln_1")
    w_attn = b.weight("c_attn.weight", (dim, 3 * dim))
    qkv = b.op("Gemm", [ln1, w_attn, b.const("c_attn.bias", np.zeros(3 * dim, np.float32))], name="c_attn")
    q, k, v = b.op("Split", [qkv, b.const("qkv_split", np.array([dim] * 3, np.int64))], outputs=3, axis=-1)
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[1, 0])], name="attn_scores")
    scores = b.op("Div", [scores, b.const("attn_div", np.array(np.sqrt(dim), np.float32))])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v], name="attn_values")
    w_proj = b.weight("attn_proj.weight_fp16", (dim, dim), dtype=np.float16)
    proj = b.op("MatMul", [ctx, b.op("Cast", [w_proj], to=TensorProto.FLOAT)], name="attn_proj")
    x2 = b.op("Add", ["x", b.op("Add", [proj, b.const("attn_proj.bias", np.zeros(dim, np.float32))])])
    ln2 = b.layernorm(x2, dim, "ln_2")
    w_q = b.const("c_fc.weight_q", b.rng.integers(-127, 128, (dim, 4 * dim)).astype(np.int8))
    w_fc = b.op("DequantizeLinear", [w_q, b.const("c_fc.scale", np.array(0.01, np.float32)),
                                     b.const("c_fc.zero_point", np.array(0, np.int8))])
    fc = b.op("Add", [b.op("MatMul", [ln2, w_fc], name="c_fc"), b.const("c_fc.bias", np.zeros(4 * dim, np.float32))])
    erf = b.op("Erf", [b.op("Div", [fc, b.const("sqrt2", np.array(np.sqrt(2), np.float32))])])
    gelu = b.op("Mul", [b.op("Mul", [fc, b.const("half", np.array(0.5, np.float32))]),
                        b.op("Add", [erf, b.const("one", np.array(1.0, np.float32))])])
    w_mproj = b.weight("mlp_proj.weight", (dim, 4 * dim))  # [out, in], used with transB=1
    mproj = b.op("Gemm", [gelu, w_mproj, b.const("mlp_proj.bias", np.zeros(dim, np.float32))], name="mlp_proj", transB=1)
    x3 = b.op("Add", [x2, mproj])
    lnf = b.layernorm(x3, dim, "ln_f")
    wte = b.weight("wte", (vocab, dim))
    logits = b.op("MatMul", [lnf, b.op("Transpose", [wte], perm=[1, 0])], name="lm_head")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", dim])
    return b.model([x], {"logits": (logits, ["seq", vocab])})


def bert_model(dim: int = 16, ffn: int = 48, classes: int = 3, seed: int = 2) -> onnx.ModelProto:
    """One BERT encoder layer on x [S, dim] (post-LN, ReLU MLP), a pooler on the first
    token and a classifier Gemm (transB=1) producing the graph output."""
    b = Builder(seed)
    q, k, v = (b.linear_b("x", n, dim, dim) for n in ("query", "key", "value"))
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[1, 0])], name="attn_scores")
    scores = b.op("Mul", [scores, b.const("attn_scale", np.array(1 / np.sqrt(dim), np.float32))])
    ctx = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v], name="attn_values")
    x2 = b.layernorm(b.op("Add", ["x", b.linear_b(ctx, "attn_out", dim, dim)]), dim, "ln_attn")
    hidden = b.op("Relu", [b.linear_b(x2, "fc1", dim, ffn)])
    x3 = b.layernorm(b.op("Add", [x2, b.linear_b(hidden, "fc2", ffn, dim)]), dim, "ln_out")
    cls = b.op("Slice", [x3, b.const("cls_start", np.array([0], np.int64)), b.const("cls_end", np.array([1], np.int64)),
                         b.const("cls_axes", np.array([0], np.int64))])
    wp = b.weight("pooler.weight", (dim, dim))
    pooled = b.op("Tanh", [b.op("Gemm", [cls, wp, b.const("pooler.bias", np.zeros(dim, np.float32))],
                                name="pooler", transB=1)])
    wc = b.weight("classifier.weight", (classes, dim))
    logits = b.op("Gemm", [pooled, wc, b.const("classifier.bias", np.zeros(classes, np.float32))],
                  name="classifier", transB=1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", dim])
    return b.model([x], {"logits": (logits, [1, classes])})


def mlp_model(dim: int = 32, hidden: int = 64, relu_hidden: int = 48, classes: int = 10, seed: int = 3) -> onnx.ModelProto:
    """A small residual network on x [N, dim] with every kind of site:
    a gated pair (w_gate, w_up share x), w_down, w_fc (+bias, ReLU), w_out on the ReLU
    output (natural), and a head w_head to the graph output."""
    b = Builder(seed)
    gate = b.op("MatMul", ["x", b.weight("w_gate", (dim, hidden))], name="gate")
    up = b.op("MatMul", ["x", b.weight("w_up", (dim, hidden))], name="up")
    a = b.op("Mul", [b.op("Tanh", [gate]), up])
    r = b.op("Add", ["x", b.op("MatMul", [a, b.weight("w_down", (hidden, dim))], name="down")])
    z = b.op("Relu", [b.op("Add", [b.op("MatMul", [r, b.weight("w_fc", (dim, relu_hidden))], name="fc"),
                                   b.const("b_fc", np.full(relu_hidden, 0.05, np.float32))])])
    r2 = b.op("Add", [r, b.op("MatMul", [z, b.weight("w_out", (relu_hidden, dim))], name="out")])
    y = b.op("MatMul", [r2, b.weight("w_head", (dim, classes))], name="head")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])
    return b.model([x], {"y": (y, ["n", classes])})


def linear_model(k: int = 8, n: int = 4, elem=TensorProto.FLOAT, seed: int = 4) -> onnx.ModelProto:
    """y = x @ W for x [R, k] of element type `elem` (float or float16)."""
    b = Builder(seed)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    y = b.op("MatMul", ["x", b.weight("w", (k, n), dtype=dtype)], name="linear")
    x = helper.make_tensor_value_info("x", elem, ["r", k])
    return b.model([x], {"y": (y, ["r", n])}, elem=elem)


def mlp_feeds(count: int, rows: int = 64, dim: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds for `mlp_model`: features with different scales, some heavy-tailed."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.5, 2.0, dim).astype(np.float32)
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((rows, dim)).astype(np.float32) * scales
        x[:, ::4] = rng.laplace(size=(rows, len(range(0, dim, 4))))
        feeds.append({"x": x.astype(np.float32)})
    return feeds


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def save_npz(feeds: list[dict[str, np.ndarray]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    return path


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (relative), with file contents; None for folders."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def mlp_path(tmp_path) -> Path:
    return save(mlp_model(), tmp_path / "models" / "mlp.onnx")


@pytest.fixture
def mlp_npz(tmp_path) -> Path:
    return save_npz(mlp_feeds(8, rows=32), tmp_path / "data" / "calib.npz")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads or writes the user's calibration cache or leaves files in the shared tmp."""
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path / "default-cache"))
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.chdir(tmp_path)
    yield
    # Any temporary folder sparsecc made for ONNX Runtime must be gone after each test.
    leftovers = sorted(os.listdir(systmp))
    assert not leftovers, f"temporary files left behind: {leftovers}"


def float32_target(tmp_path):
    """The seneca target with 32-bit values: the simulator must then equal ORT to float32 rounding."""
    from sparsecc.backends.seneca.target import builtin, load_target

    text = builtin()["seneca"].read_text().replace('value_format = { value = "float16"', 'value_format = { value = "float32"')
    path = tmp_path / "seneca32.toml"
    path.write_text(text)
    return load_target(path)
