"""Already-quantized (QDQ) models: fold-qdq on inline graphs, ONNX Runtime's quantize_static
output folded, thresholded and simulated on the seneca target."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import float32_target, llama_model, save
from onnx import TensorProto, helper, numpy_helper

import sparsecc
from sparsecc import model_io, ops
from sparsecc.backends.seneca.simulator import Simulator
from sparsecc.backends.seneca.summary import Agreement
from sparsecc.backends.seneca.target import load_target
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.pipeline import default_pipeline
from sparsecc.runtime import ort_session
from sparsecc.sites import analyze, int8_operands


def qdq_linear(zero_point: int = 0, activation=TensorProto.INT8) -> object:
    """x -> Q -> DQ -> MatMul(., DQ(Q(Transpose(W)))): the weight quantized at run time, as
    quantize_static leaves a weight that goes through a layout op."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)          # [N, K], transposed to [K, N]
    inits = [numpy_helper.from_array(w, "W"),
             numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             helper.make_tensor("zx", activation, [], [zero_point]),
             numpy_helper.from_array((np.abs(w).max(axis=1) / 127).astype(np.float32), "sw"),
             helper.make_tensor("zw", TensorProto.INT8, [6], [0] * 6)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
             helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
             helper.make_node("QuantizeLinear", ["Wt", "sw", "zw"], ["wq"], name="qw", axis=1),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], name="dqw", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model, feed):
    with ort_session(model, optimize=False) as session:
        return session.run(None, feed)[0]


def test_fold_qdq_turns_a_run_time_weight_quantizer_into_int8_weights(tmp_path):
    model = model_io.load_model(save(qdq_linear(), tmp_path / "m.onnx"))
    assert analyze(model.graph).sites == []          # the weight is not constant until folded
    feed = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}
    before = run(model, feed)
    report, = PassManager([get("fold-qdq")()]).run(model, Context())
    assert report.details["weights_folded"] == 1 and report.details["integer_sites"] == 1
    node, = analyze(model.graph).nodes
    found = int8_operands(node)
    assert found is not None and found.weight.dtype == np.int8 and found.weight.shape == (8, 6)
    assert not any(n.op_type == "Transpose" for n in model.graph)    # the float weight path is gone
    np.testing.assert_array_equal(run(model, feed), before)           # the same integers, the same outputs


@pytest.mark.parametrize("zero_point, activation, reason", [(3, TensorProto.INT8, "non-zero zero point"),
                                                             (128, TensorProto.UINT8, "uint8, not int8")])
def test_fold_qdq_says_why_a_site_stays_float(tmp_path, zero_point, activation, reason):
    model = model_io.load_model(save(qdq_linear(zero_point, activation), tmp_path / "m.onnx"))
    report, = PassManager([get("fold-qdq")()]).run(model, Context())
    assert report.details["integer_sites"] == 0
    assert reason in report.details["declined"][0]["reason"] and "activations" in report.details["declined"][0]["reason"]


def llama_feeds(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(n)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The tiny Llama quantized by onnxruntime.quantization.quantize_static (QDQ, int8 symmetric)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("qdq")
    source = save(llama_model(), folder / "float.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(llama_feeds(8))

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(source), str(folder / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return folder / "qdq.onnx"


def pinned_run(model, target, feed):
    """The simulator with ORT's decisions at every Threshold and QuantizeLinear, and the check."""
    sim = Simulator(model, target)
    steps = [n for n in sim.nodes if n.name in sim.live and (ops.is_threshold(n) or n.op_type == "QuantizeLinear")]
    with ort_session(model, [n.outputs[0].name for n in steps], optimize=False) as session:
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, feed)))
    result = sim.run(feed, keep=tuple(n.inputs[0].name for n in steps),
                     decisions={n.outputs[0].name: got[n.outputs[0].name] for n in steps})
    check = Agreement()
    check.add(result.outputs[names[0]], got[names[0]])
    for n in steps:
        if n.op_type == "QuantizeLinear":
            check.add_quantized(result.outputs[n.inputs[0].name], got[n.outputs[0].name], sim.constants[n.inputs[1].name],
                                sim.constants.get(n.inputs[2].name))
    return sim, result, check, got[names[0]]


def test_quantize_static_model_folds_and_simulates_within_one_step(quantized, tmp_path):
    out = tmp_path / "out"
    result = sparsecc.compile_model(quantized, default_pipeline(thresholds=False), None, out=out, target="seneca")
    fold = next(p for p in result.report["passes"] if p["pass"] == "fold-qdq")["details"]
    assert fold["weights_folded"] > 0 and fold["float_sites"] == 0 and fold["integer_sites"] == 8
    model = model_io.load_model(out / "model.onnx")
    feed = llama_feeds(1, seed=5)[0]
    np.testing.assert_array_equal(run(model, feed), run(model_io.load_model(quantized), feed))
    for target, most in ((float32_target(tmp_path), 0), (load_target("seneca"), 1)):
        sim, step, check, ref = pinned_run(model, target, feed)
        assert len(sim.int8) == 8 and step.counts["MAC8"] > 0
        assert check.quantized > 0 and check.max_steps <= most
        assert check.err <= 0.01 * np.abs(ref).max() and check.agree == check.tokens


def test_thresholds_go_before_the_quantizers_of_a_qdq_model(quantized, tmp_path):
    sparsecc.compile_model(quantized, default_pipeline(sparsity=0.5), llama_feeds(), out=tmp_path / "s", target="seneca")
    model = model_io.load_model(tmp_path / "s" / "model.onnx")
    analysis = analyze(model.graph)
    body = [(s, n) for s, n in zip(analysis.sites, analysis.nodes) if not s.head]
    assert body and all(s.threshold is not None and int8_operands(n) is not None for s, n in body)
    for site, node in body:   # x -> Threshold -> QuantizeLinear -> DequantizeLinear -> site
        assert ops.is_threshold(int8_operands(node).events.producer().inputs[0].producer())
    _, step, check, _ = pinned_run(model, load_target("seneca"), llama_feeds(1, seed=5)[0])
    assert check.max_steps <= 1 and step.mac_lane_ops < step.dense_macs
