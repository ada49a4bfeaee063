"""Property-based: compile on random small graphs either succeeds with a model ONNX Runtime
runs as intended, or fails with a SparseccError (never another exception, never a partial
output folder).

Graphs: x [n, d] (float32) through 1-5 random layers: MatMul / Gemm (transB or not, with a
bias) / MatMul through a transposed weight, all with constant weights, and Relu, Sigmoid,
Tanh, x * sigmoid(x), a constant Add or Mul, a residual Add, an identity Reshape. Calibration
feeds are random (.npz, several scales). For each graph:
- at sparsity 0 the compiled model equals the source in ORT, max |diff| within 1e-5 of the
  output's peak (every t is 0; ORT may fuse the two graphs differently, hence not exact);
- at a target sparsity every Threshold's output is exactly x where |x| > t and exactly 0
  where |x| <= t (t read from the compiled model, x and y fetched from ORT), and the same
  inputs compile to byte-identical outputs;
- or compile raises SparseccError (e.g. a graph without sites) and leaves no folder.
Derandomized, 25 examples: the same graphs on every run.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from conftest import IR_VERSION, OPSET, listing
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import sparsecc
from sparsecc import ops
from sparsecc.errors import SparseccError
from sparsecc.model_io import load_model
from sparsecc.runtime import ort_session

SPARSITY_0_RTOL = 1e-5
WIDTHS = (4, 8, 12)
LINEAR = ("matmul", "gemm", "gemm_t", "matmul_wt")
LAYERS = LINEAR + ("relu", "sigmoid", "tanh", "silu", "add_const", "mul_const", "residual", "reshape")

layer = st.tuples(st.sampled_from(LAYERS), st.sampled_from(WIDTHS))
graph_spec = st.fixed_dictionaries({
    "width": st.sampled_from(WIDTHS),
    # mostly a linear layer first, so that most graphs have a site besides the head
    "layers": st.tuples(st.sampled_from(LINEAR + ("relu",)), st.sampled_from(WIDTHS)).flatmap(
        lambda first: st.lists(layer, min_size=1, max_size=4).map(lambda rest: [first, *rest])),
    "seed": st.integers(0, 2**16),
    "samples": st.integers(1, 3),
    "rows": st.sampled_from([1, 3, 8]),
    "scale": st.sampled_from([1e-3, 1.0, 1e3]),
    "sparsity": st.sampled_from([0.25, 0.5, 0.8]),
    "mode": st.sampled_from(["mac-weighted", "uniform"]),
})


def build(spec: dict) -> onnx.ModelProto:
    """The random graph of `spec` (weights drawn from its seed)."""
    rng = np.random.default_rng(spec["seed"])
    nodes, inits = [], []
    widths = {"x": spec["width"]}        # tensor -> width of its last axis
    current = "x"

    def const(array) -> str:
        name = f"c{len(inits)}"
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def node(op, inputs, width, **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"n{len(nodes)}", **attrs))
        widths[out] = width
        return out

    for kind, out_width in spec["layers"]:
        d = widths[current]
        w = rng.standard_normal((d, out_width)) / np.sqrt(d)
        if kind == "matmul":
            current = node("MatMul", [current, const(w)], out_width)
        elif kind == "gemm":
            current = node("Gemm", [current, const(w), const(rng.standard_normal(out_width) * 0.1)], out_width)
        elif kind == "gemm_t":
            current = node("Gemm", [current, const(w.T), const(np.zeros(out_width))], out_width, transB=1)
        elif kind == "matmul_wt":
            current = node("MatMul", [current, node("Transpose", [const(w.T)], d, perm=[1, 0])], out_width)
        elif kind in ("relu", "sigmoid", "tanh"):
            current = node(kind.capitalize(), [current], d)
        elif kind == "silu":
            current = node("Mul", [current, node("Sigmoid", [current], d)], d)
        elif kind == "add_const":
            current = node("Add", [current, const(rng.standard_normal(d))], d)
        elif kind == "mul_const":
            current = node("Mul", [current, const(rng.standard_normal(d))], d)
        elif kind == "residual":   # the latest earlier tensor of the same width, else itself
            earlier = [t for t in widths if widths[t] == d and t != current]
            current = node("Add", [current, earlier[-1] if earlier else current], d)
        else:
            shape = numpy_helper.from_array(np.array([-1, d], np.int64), f"s{len(inits)}")
            inits.append(shape)
            current = node("Reshape", [current, shape.name], d)
    nodes.append(helper.make_node("Identity", [current], ["y"], name="output"))
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", spec["width"]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", widths[current]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def feeds(spec: dict) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"] + 1)
    return (rng.standard_normal((spec["samples"], spec["rows"], spec["width"])) * spec["scale"]).astype(np.float32)


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["y"], {"x": sample})[0] for sample in x])


def compile_or_fail_cleanly(source: Path, npz: Path, out: Path, **pipeline) -> bool:
    """True when compiled; False on a SparseccError, after checking nothing was left."""
    try:
        sparsecc.compile_model(source, sparsecc.default_pipeline(**pipeline), sparsecc.data_source(npz), out=out)
    except SparseccError as exc:
        assert "\n" not in str(exc)
        assert not out.exists() and not any(out.parent.glob(f".{out.name}*"))
        return False
    return True


def check_thresholds(model_path: Path, x: np.ndarray) -> int:
    """Every Threshold's output in ORT is exactly x where |x| > t and 0 elsewhere; returns
    how many values were checked."""
    model = load_model(model_path)
    thresholds = [n for n in model.graph if ops.is_threshold(n)]
    names = [v.name for n in thresholds for v in (n.inputs[0], n.outputs[0])]
    checked = 0
    with ort_session(model, names) as session:
        for sample in x:
            values = dict(zip(names, session.run(names, {"x": sample})))
            for n in thresholds:
                t = n.inputs[1].const_value.numpy()
                before, after = values[n.inputs[0].name], values[n.outputs[0].name]
                kept = np.abs(before) > t
                assert np.array_equal(after[kept], before[kept]) and not after[~kept].any(), n.name
                checked += before.size
    return checked


@settings(max_examples=25, deadline=None, derandomize=True)
@given(graph_spec)
def test_compile_random_graphs(spec):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        source = root / "model.onnx"
        onnx.save(build(spec), str(source))
        x = feeds(spec)
        npz = root / "calib.npz"
        np.savez(npz, x=x)
        reference = run_ort(source, x)

        if compile_or_fail_cleanly(source, npz, root / "dense", sparsity=0.0, mode=spec["mode"]):
            got = run_ort(root / "dense" / "model.onnx", x)
            peak = max(float(np.abs(reference).max()), np.finfo(np.float32).tiny)
            assert np.abs(got - reference).max() <= SPARSITY_0_RTOL * peak

        outs = [root / "a", root / "b"]
        if compile_or_fail_cleanly(source, npz, outs[0], sparsity=spec["sparsity"], mode=spec["mode"]):
            assert check_thresholds(outs[0] / "model.onnx", x) > 0 or not any(
                ops.is_threshold(n) for n in load_model(outs[0] / "model.onnx").graph)
            assert compile_or_fail_cleanly(source, npz, outs[1], sparsity=spec["sparsity"], mode=spec["mode"])
            a, b = listing(outs[0]), listing(outs[1])
            a.pop("timings.json"), b.pop("timings.json")
            assert a == b    # same inputs, same bytes


def test_a_fixed_graph_reaches_every_check(tmp_path):
    """The property's checks are not vacuous: a graph with two body sites compiles at 0 and
    at a target, and the threshold check sees values."""
    spec = {"width": 8, "layers": [("matmul", 12), ("silu", 12), ("gemm_t", 8), ("relu", 8), ("matmul", 4)],
            "seed": 1, "samples": 2, "rows": 8, "scale": 1.0, "sparsity": 0.5, "mode": "uniform"}
    source = tmp_path / "model.onnx"
    onnx.save(build(spec), str(source))
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=feeds(spec))
    assert compile_or_fail_cleanly(source, npz, tmp_path / "dense", sparsity=0.0, mode="uniform")
    got, reference = run_ort(tmp_path / "dense" / "model.onnx", feeds(spec)), run_ort(source, feeds(spec))
    assert np.abs(got - reference).max() <= SPARSITY_0_RTOL * np.abs(reference).max()
    assert compile_or_fail_cleanly(source, npz, tmp_path / "half", sparsity=0.5, mode="uniform")
    assert check_thresholds(tmp_path / "half" / "model.onnx", feeds(spec)) == 2 * 8 * (8 + 12)   # two thresholds
