"""Weight quantization: the math (property tests) and the quantize-weights pass on inline models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import bert_model, gpt2_model, llama_model, to_ir
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sparsecc import model_io
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.quant import dequantize, quantize
from sparsecc.runtime import ort_session
from sparsecc.sites import analyze

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def weights(draw):
    k = draw(st.sampled_from([4, 8, 12]))
    return draw(arrays(np.float32, (k, draw(st.integers(1, 6))), elements=finite))


@settings(max_examples=200, deadline=None)
@given(weights(), st.sampled_from([8, 4]), st.sampled_from([0, 2, 4]))
def test_round_trip_error_is_at_most_half_a_step(w, bits, group):
    q, scale = quantize(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == np.int8 and np.abs(q).max(initial=0) <= qmax
    assert scale.shape == (w.shape[0] // (group or w.shape[0]), w.shape[1]) and (scale > 0).all()
    step = np.repeat(scale, group or w.shape[0], axis=0)
    assert (np.abs(dequantize(q, scale) - w) <= step / 2 * (1 + 1e-6) + 1e-30).all()
    # Symmetric: zero stays zero, negation commutes, each block's peak maps to +-qmax.
    assert (q[w == 0] == 0).all()
    np.testing.assert_array_equal(quantize(-w, bits, group)[0], -q)
    blocks = np.abs(w).reshape(scale.shape[0], -1, w.shape[1]).max(axis=1)
    assert (np.abs(q).reshape(scale.shape[0], -1, w.shape[1]).max(axis=1)[blocks > 0] == qmax).all()


def test_subnormal_peak_gets_a_usable_scale():
    q, scale = quantize(np.array([[1e-45], [0.0]], np.float32))
    assert scale.tolist() == [[1.0]] and q.tolist() == [[0], [0]]


def test_bad_settings():
    with pytest.raises(SparseccError, match="does not divide"):
        quantize(np.ones((6, 2), np.float32), 4, 4)
    with pytest.raises(SparseccError, match="8 or 4 bits"):
        quantize(np.ones((6, 2), np.float32), 2)


def run(model, feeds):
    with ort_session(model) as session:
        return session.run(None, feeds)[0]


@pytest.mark.parametrize("build, feeds", [
    (llama_model, {"input_ids": np.array([[1, 5, 7, 2, 9, 3]], np.int64)}),
    (gpt2_model, {"x": np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)}),
    (bert_model, {"x": np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)}),
])
@pytest.mark.parametrize("bits, group, tolerance", [(8, 0, 0.05), (4, 8, 0.3)])
def test_pass_keeps_sites_and_outputs(build, feeds, bits, group, tolerance, tmp_path):
    model = to_ir(build())
    reference = run(model, feeds)
    sites = [(s.in_features, s.out_features, s.head, s.natural) for s in analyze(model.graph).sites]
    PassManager([get("quantize-weights")(bits=bits, group=group)]).run(model, Context())
    assert [(s.in_features, s.out_features, s.head, s.natural) for s in analyze(model.graph).sites] == sites
    out = run(model, feeds)
    assert np.abs(out - reference).max() <= tolerance * np.abs(reference).max()
    # Saved, every site's weight is an int8 initializer (the float ones are gone).
    path = tmp_path / "q.onnx"
    model_io.save_model(model, path)
    saved = onnx.load(str(path))
    kinds = {init.name: init.data_type for init in saved.graph.initializer}
    for site in analyze(model_io.load_model(path).graph).sites:
        assert kinds[site.weight] == onnx.TensorProto.INT8


def test_head_can_stay_float():
    model = to_ir(llama_model())
    head = next(s for s in analyze(model.graph).sites if s.head)
    PassManager([get("quantize-weights")(include_head=False)]).run(model, Context())
    after = {s.node: s for s in analyze(model.graph).sites}
    assert model.graph.initializers[after[head.node].weight].const_value.dtype == onnx.TensorProto.FLOAT
    assert all(model.graph.initializers[s.weight].const_value.dtype == onnx.TensorProto.INT8
               for s in after.values() if not s.head)
