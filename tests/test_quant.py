"""Weight quantization: the math (property tests) and the quantize-weights pass on inline models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import SAMPLE_MODEL, bert_model, gpt2_model, llama_model, to_ir
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


# Activation quantization -------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["normal", "laplace", "uniform"]), st.integers(0, 2**31 - 1))
def test_mse_clip_beats_max_clip(kind, seed):
    from sparsecc.calibration import AbsHistogram
    from sparsecc.passes.quantize_activations import QMAX, clip_value

    x = getattr(np.random.default_rng(seed), kind)(size=20000).astype(np.float32)
    hist = AbsHistogram()
    hist.add(x)

    def error(clip):  # measured on the data itself, not on the histogram
        s = clip / QMAX
        return float(np.mean((np.clip(np.rint(x / s), -QMAX, QMAX) * s - x) ** 2))

    (mse, mse_error), (peak, peak_error) = clip_value(hist, "mse"), clip_value(hist, "max")
    assert 0 < mse <= peak and peak >= np.abs(x).max()
    assert error(mse) <= error(peak) * 1.05     # the search sees values to the histogram's ~1% bins
    assert 0 < mse_error <= peak_error     # relative to the data's power
    assert mse_error == pytest.approx(error(mse) / np.mean(x.astype(np.float64) ** 2), rel=0.25)


def quantized_llama(tmp_path, sparsity=0.5):
    import sparsecc
    from sparsecc.pipeline import default_pipeline
    from conftest import save

    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(4)]
    path = save(llama_model(), tmp_path / "m.onnx")
    sparsecc.compile_model(path, default_pipeline(sparsity=sparsity, quant="w8a8"), feeds, out=tmp_path / "q")
    return model_io.load_model(tmp_path / "q" / "model.onnx"), feeds


def test_quantize_activations_makes_every_site_int8(tmp_path):
    from sparsecc import ops
    from sparsecc.sites import int8_operands

    model, feeds = quantized_llama(tmp_path)
    analysis = analyze(model.graph)
    assert all(int8_operands(node) is not None for node in analysis.nodes)
    # one decision: a kept value never rounds to zero, a zeroed one sends nothing
    pairs = []
    for node in analysis.nodes:
        found = int8_operands(node)
        before = found.events.producer().inputs[0]
        if before.producer() is not None and ops.is_threshold(before.producer()):
            t = float(before.producer().inputs[1].const_value.numpy())
            assert t >= found.event_scale / 2 * (1 - 1e-6)
            pairs.append((before.name, found.events.name))
    assert pairs
    names = sorted({n for pair in pairs for n in pair})
    with ort_session(model, names, optimize=False) as session:
        outs = [o.name for o in session.get_outputs()]
        for feed in feeds:
            got = dict(zip(outs, session.run(outs, feed)))
            for kept, q in pairs:
                np.testing.assert_array_equal(got[kept] != 0, got[q] != 0)


def test_w8a8_stays_close_to_float(tmp_path):
    """Without thresholds (whose flips would dominate on a random model): int8 weights and
    events stay within 10% of the output range on this tiny model (48 calibration tokens)."""
    import sparsecc
    from sparsecc.pipeline import default_pipeline
    from conftest import save

    model, feeds = quantized_llama(tmp_path, sparsity=0.0)
    path = save(llama_model(), tmp_path / "f.onnx")
    sparsecc.compile_model(path, default_pipeline(sparsity=0.0), feeds, out=tmp_path / "f")
    float_model = model_io.load_model(tmp_path / "f" / "model.onnx")
    for feed in feeds:
        ref, out = run(float_model, feed), run(model, feed)
        assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()


def test_tied_embedding_reads_the_quantized_head_weight():
    """The bundled sample's LM head is its token table transposed: after quantize-weights both
    read the same int8 initializer, so the partition still holds the table once."""
    from sparsecc.sites import const_root

    model = model_io.load_model(SAMPLE_MODEL)
    feeds = {"input_ids": np.array([[1, 50, 7, 300, 9]], np.int64)}
    reference = run(model, feeds)
    report, = PassManager([get("quantize-weights")()]).run(model, Context())
    assert report.details["tied_tables"] == 1
    analysis = analyze(model.graph)
    head = next(n for s, n in zip(analysis.sites, analysis.nodes) if s.head)
    table = next(n for n in model.graph if n.op_type == "Gather" and const_root(n.inputs[0]) is const_root(head.inputs[1]))
    assert const_root(table.inputs[0]).const_value.dtype == onnx.TensorProto.INT8
    assert np.abs(run(model, feeds) - reference).max() <= 0.05 * np.abs(reference).max()
    partition, = PassManager([get("partition")(max_context=8)]).run(model, Context())
    assert len(partition.details["tied_weights"]) == 1
