"""The Threshold op (domain ai.sparsecc) run by ONNX Runtime matches NumPy bit for bit."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import linear_model, to_ir
from onnx import TensorProto

from sparsecc import ops, passes
from sparsecc.pass_manager import Context

DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


def thresholded_model(elem) -> tuple[ir.Model, ir.Node]:
    model = to_ir(linear_model(k=8, n=4, elem=elem))
    report = passes.get("insert-thresholds")(include_head=True).run(model, Context()).details
    assert report["thresholds"] == 1 and report["sites"] == 1
    (node,) = [n for n in model.graph if ops.is_threshold(n)]
    return model, node


def run(model: ir.Model, node: ir.Node, t, x: np.ndarray, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """Set t, save, and run in ONNX Runtime; return (Threshold output, y)."""
    dtype = node.inputs[1].dtype.numpy()
    node.inputs[1].const_value = ir.tensor(np.array(t, dtype=dtype))
    model.graph.outputs.append(node.outputs[0])
    try:
        path = tmp_path / f"thr-{np.dtype(dtype).name}-{float(t)}.onnx"
        ir.save(model, path)
    finally:
        model.graph.outputs.pop()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)  # the model-local function is valid ONNX
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, thr = session.run(["y", node.outputs[0].name], {"x": x})
    return thr, y


def special_values(dtype, t):
    t = dtype(t)
    up, down = np.nextafter(t, dtype(np.inf)), np.nextafter(t, dtype(0))
    tiny = np.finfo(dtype).smallest_subnormal
    return np.array([0.0, -0.0, t, -t, up, -up, down, -down, tiny, -tiny, 1e-3, -1e-3, 3.0, -3.0, -7.5, 7.5],
                    dtype=dtype)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_threshold_matches_numpy(name, tmp_path):
    dtype, elem = DTYPES[name]
    model, node = thresholded_model(elem)
    assert node.inputs[1].dtype.numpy() == np.dtype(dtype)  # t has x's type
    rng = np.random.default_rng(0)
    random_part = rng.standard_normal((30, 8)).astype(dtype)
    t_data = float(np.median(np.abs(random_part)))  # a t that is also a data value: ties exist
    for t in (0.0, 0.5, t_data, 2.0):
        x = np.concatenate([special_values(dtype, t).reshape(2, 8), random_part,
                            np.zeros((1, 8), dtype), np.full((1, 8), -dtype(t))])
        assert x.dtype == dtype
        thr, y = run(model, node, t, x, tmp_path)
        expected = np.where(np.abs(x) > dtype(t), x, dtype(0))
        assert thr.dtype == dtype and thr.shape == x.shape
        # Bit-exact: kept values unchanged, dropped ones +0.
        np.testing.assert_array_equal(thr.view(np.uint16 if dtype == np.float16 else np.uint32),
                                      expected.view(np.uint16 if dtype == np.float16 else np.uint32))
        # Values equal to +-t become 0; values just above survive.
        at_t = np.abs(x) == dtype(t)
        assert at_t.any()
        assert (thr[at_t] == 0).all()
        above = np.abs(x) > dtype(t)
        assert (thr[above] == x[above]).all()
        # The site consumes the thresholded tensor.
        w = np.asarray(onnx.numpy_helper.to_array(
            next(i for i in onnx.load(str(tmp_path / f"thr-{np.dtype(dtype).name}-{float(t)}.onnx")).graph.initializer
                 if i.name == "w")))
        tol = 1e-5 if dtype == np.float32 else 2e-2
        np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32) @ w.astype(np.float32),
                                   rtol=tol, atol=tol)


def test_zero_threshold_keeps_everything_but_zeros(tmp_path):
    model, node = thresholded_model(TensorProto.FLOAT)
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    x[::3, ::2] = 0.0
    thr, _ = run(model, node, 0.0, x, tmp_path)
    np.testing.assert_array_equal(thr, x)


def test_threshold_function_is_registered_once():
    model, _ = thresholded_model(TensorProto.FLOAT)
    assert model.opset_imports[ops.DOMAIN] == ops.VERSION
    assert (ops.DOMAIN, ops.THRESHOLD, "") in model.functions
    ops.ensure_threshold_function(model)
    assert len(model.functions) == 1


def _fp16_untyped_model() -> onnx.ModelProto:
    """fp16 sites whose activations have no declared type (no value_info): weights through a
    Transpose, and through a Cast from float32 storage."""
    from conftest import Builder
    from onnx import helper

    b = Builder(8)
    w1 = b.op("Transpose", [b.weight("w1", (6, 8), dtype=np.float16)], perm=[1, 0])
    h = b.op("MatMul", [b.op("Tanh", ["x"]), w1])
    w2 = b.op("Cast", [b.weight("w2", (6, 5))], to=TensorProto.FLOAT16)
    h2 = b.op("MatMul", [b.op("Sigmoid", [h]), w2])
    y = b.op("Add", [h2, b.const("bias", np.zeros(5, np.float16))])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["r", 8])
    return b.model([x], {"y": (y, ["r", 5])}, elem=TensorProto.FLOAT16)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "fp16-untyped"])
def test_thresholds_on_graphs_without_value_info_run(arch, tmp_path):
    """insert-thresholds on exported graphs that declare no intermediate types: the model
    still saves, loads in ONNX Runtime, and each Threshold keeps its activation's type."""
    from conftest import bert_model, gpt2_model, llama_model

    builders = {"llama": llama_model, "gpt2": gpt2_model, "bert": bert_model, "fp16-untyped": _fp16_untyped_model}
    proto = builders[arch]()
    assert not proto.graph.value_info
    model = to_ir(proto)
    passes.get("insert-thresholds")().run(model, Context())
    nodes = [n for n in model.graph if ops.is_threshold(n)]
    assert nodes
    rng = np.random.default_rng(2)
    if arch == "llama":
        feed = {"input_ids": rng.integers(0, 24, (1, 7)).astype(np.int64)}
    else:
        dtype = np.float16 if arch == "fp16-untyped" else np.float32
        feed = {"x": rng.standard_normal((7, 8 if arch == "fp16-untyped" else 16)).astype(dtype)}
    for node in nodes:
        dtype = node.inputs[1].dtype.numpy()
        node.inputs[1].const_value = ir.tensor(np.array(0.3, dtype=dtype))
    names = [n.outputs[0].name for n in nodes]
    model.graph.outputs.extend(n.outputs[0] for n in nodes)
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(names, feed)
    for node, out in zip(nodes, outs):
        assert out.dtype == node.inputs[1].dtype.numpy()
        assert ((out == 0) | (np.abs(out) > out.dtype.type(0.3))).all()
        assert (out == 0).any() and (out != 0).any()
