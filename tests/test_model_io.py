"""Models with external data load and compile to a self-contained output."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
from conftest import mlp_feeds, mlp_model

import sparsecc
from sparsecc import model_io


def test_external_data_model_compiles_to_a_self_contained_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(mlp_model(), str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (src / "weights.bin").stat().st_size > 10_000
    model = model_io.load_model(src / "model.onnx")
    assert len(model.graph.initializers) > 0
    out = tmp_path / "out"
    sparsecc.compile_model(src / "model.onnx", sparsecc.default_pipeline(sparsity=0.5), mlp_feeds(4), out=out)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.onnx", "report.html", "report.json",
                                                     "report.md", "timings.json"]
    shutil.rmtree(src)   # the output must not refer back to the source's weights
    feed = mlp_feeds(1, seed=9)[0]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, feed)
    assert y.shape == (64, 10) and np.isfinite(y).all()


def test_compiled_model_differs_from_the_source_only_by_thresholds(tmp_path):
    """With every t = 0 (sparsity 0) the compiled model computes exactly what the source does."""
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(src))
    out = tmp_path / "out"
    sparsecc.compile_model(src, sparsecc.default_pipeline(sparsity=0.0), mlp_feeds(2), out=out)
    feed = mlp_feeds(1, seed=5)[0]
    feed["x"][:, :3] = 0.0
    dense = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    compiled = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(dense, compiled)
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert sum(n.op_type == "Threshold" and n.domain == "ai.sparsecc" for n in proto.graph.node) == 3
    assert {f.name for f in proto.functions} == {"Threshold"}


def test_compiled_llama_without_value_info_is_valid_onnx(tmp_path):
    """An exported graph that declares no intermediate types compiles to a model that passes
    the ONNX checker (with shape inference through the Threshold function) and runs."""
    from conftest import llama_model

    src = tmp_path / "llama.onnx"
    onnx.save(llama_model(), str(src))
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 24, (1, 16)).astype(np.int64)} for _ in range(4)]
    out = tmp_path / "out"
    result = sparsecc.compile_model(src, sparsecc.default_pipeline(sparsity=0.5), feeds, out=out)
    assert len(result.report["passes"][2]["details"]["thresholds"]) == 4   # qkv, o, gate/up, down
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, feeds[0])
    assert logits.shape == (1, 16, 24) and np.isfinite(logits).all()
