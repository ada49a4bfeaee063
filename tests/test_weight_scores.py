"""weight-scores (WINA): thresholds on |x_i| x the L2 norm of the weights channel i multiplies,
as per-channel t = tau / c. The op with a vector t in ONNX Runtime; the score's ordering;
calibrated sparsity measured in ORT; equivalence with magnitude thresholds when every norm is
equal; every threshold method; the seneca backend against ORT; determinism; bad config."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import Builder, listing, llama_model, mlp_feeds, mlp_model, save, save_npz, to_ir
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import sparsecc
from sparsecc import model_io, ops
from sparsecc.backends.ort import OrtBackend
from sparsecc.backends.seneca.simulation import simulate
from sparsecc.backends.seneca.simulator import Simulator
from sparsecc.backends.seneca.target import load_target
from sparsecc.calibration import AbsHistogram, collect, statistic
from sparsecc.data import IterableFeeds, as_feed_source
from sparsecc.errors import PreconditionError, SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.pipeline import default_pipeline
from sparsecc.runtime import ort_session


def with_scores(passes, **options):
    """`passes` with weight-scores right after insert-thresholds."""
    at = next(i for i, p in enumerate(passes) if p.name == "insert-thresholds") + 1
    return passes[:at] + [get("weight-scores")(**options)] + passes[at:]


def run(model, passes, feeds, cache_dir=None):
    return PassManager(passes).run(model, Context(calibration=as_feed_source(feeds), cache_dir=cache_dir))


def thresholds(model):
    return [n for n in model.graph if ops.is_threshold(n)]


def threshold_outputs(model, feeds):
    """Every Threshold's output in ORT, concatenated over `feeds`, and the graph outputs."""
    names = [n.outputs[0].name for n in thresholds(model)]
    with ort_session(model, names) as session:
        outputs = [o.name for o in session.get_outputs()]
        runs = [dict(zip(outputs, session.run(outputs, feed))) for feed in feeds]
    return {name: np.concatenate([r[name].reshape(-1, r[name].shape[-1]) for r in runs]) for name in outputs}


# The op ------------------------------------------------------------------------------------------

def test_a_vector_t_runs_in_ort_and_the_reference_as_numpy_does(tmp_path):
    """Threshold(x, t) with one t per channel (last axis): the function body broadcasts, the
    model passes the full ONNX checker, and ORT and onnx's reference match NumPy bit for bit."""
    model = to_ir(linear_model_with(np.ones((8, 4), np.float32)))
    PassManager([get("insert-thresholds")(include_head=True)]).run(model, Context())
    (node,) = thresholds(model)
    ops.set_score_scale(node, np.arange(1, 9, dtype=np.float32))
    ops.set_threshold(node, 2.0)
    t = node.inputs[1].const_value.numpy()
    assert t.shape == (8,) and np.array_equal(t, (2.0 / np.arange(1, 9)).astype(np.float32))
    model.graph.outputs.append(node.outputs[0])
    path = tmp_path / "vector_t.onnx"
    ir.save(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    rng = np.random.default_rng(0)
    x = np.concatenate([np.tile(t, (2, 1)), -np.tile(t, (2, 1)), rng.standard_normal((20, 8)).astype(np.float32)])
    expected = np.where(np.abs(x) > t, x, np.float32(0))
    with ort_session(model) as session:
        got = session.run([node.outputs[0].name], {"x": x})[0]
    reference = ReferenceEvaluator(str(path)).run([node.outputs[0].name], {"x": x})[0]
    assert np.array_equal(got, expected) and np.array_equal(reference, expected)
    assert not np.any(got[:4])   # |x| == t exactly: dropped, per channel


def test_level_zero_is_the_identity_and_a_zero_row_is_always_dropped():
    model = to_ir(linear_model_with(np.ones((4, 2), np.float32)))
    PassManager([get("insert-thresholds")(include_head=True)]).run(model, Context())
    (node,) = thresholds(model)
    ops.set_score_scale(node, np.array([0.0, 1.0, 2.0, 4.0], np.float32))
    assert np.array_equal(node.inputs[1].const_value.numpy(), np.zeros(4, np.float32))
    ops.set_threshold(node, 1.0)
    assert np.array_equal(node.inputs[1].const_value.numpy(), np.array([np.inf, 1.0, 0.5, 0.25], np.float32))
    assert ops.threshold_level(node) == 1.0
    ops.raise_threshold(node, np.float32(0.75))
    assert np.array_equal(node.inputs[1].const_value.numpy(), np.array([np.inf, 1.0, 0.75, 0.75], np.float32))


# The score -------------------------------------------------------------------------------------

def linear_model_with(weight: np.ndarray) -> onnx.ModelProto:
    b = Builder()
    y = b.op("MatMul", ["x", b.const("w", weight)], name="linear")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", weight.shape[0]])
    return b.model([x], {"y": (y, ["r", weight.shape[1]])})


def test_a_channel_with_large_weights_is_kept_over_an_equal_one_with_small_weights():
    """Eight channels with the same distribution of |x|; channel i's weight row has norm 2^(i-4).
    Magnitude thresholds zero every channel alike; weight-aware ones zero the small-weight
    channels and keep the large-weight ones, and an input with equal |x| everywhere keeps
    exactly a suffix of the channels, ordered by weight."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    weight *= (2.0 ** (np.arange(8) - 4) / np.linalg.norm(weight, axis=1))[:, None].astype(np.float32)
    feeds = [{"x": rng.standard_normal((256, 8)).astype(np.float32)} for _ in range(4)]
    zeros = {}
    for scored in (False, True):
        model = to_ir(linear_model_with(weight))
        passes = [get("insert-thresholds")(include_head=True), get("calibrate-thresholds")(sparsity=0.5, mode="uniform")]
        run(model, with_scores(passes) if scored else passes, feeds)
        out = threshold_outputs(model, feeds)[thresholds(model)[0].outputs[0].name]
        zeros[scored] = (out == 0).mean(axis=0)
        if scored:
            equal = np.full((1, 8), np.median(np.abs(feeds[0]["x"])), np.float32)
            with ort_session(model, [thresholds(model)[0].outputs[0].name]) as session:
                kept = session.run([thresholds(model)[0].outputs[0].name], {"x": equal})[0][0] != 0
            assert 0 < kept.sum() < 8 and np.array_equal(kept, np.sort(kept))   # [False.., True..]
    assert np.all(np.abs(zeros[False] - 0.5) < 0.1)                        # magnitude: every channel alike
    assert np.all(np.diff(zeros[True]) <= 0)                               # weight-aware: ordered by weight
    assert zeros[True][0] > 0.95 and zeros[True][-1] < 0.05
    assert abs(zeros[True].mean() - 0.5) < 0.01                            # at the same sparsity


@pytest.mark.parametrize("mode, sparsity", [("uniform", 0.3), ("uniform", 0.7), ("mac-weighted", 0.6)])
def test_calibrated_sparsity_meets_the_target_in_ort(mlp_path, tmp_path, mode, sparsity):
    held_out = mlp_feeds(24, seed=11)
    out = tmp_path / "out"
    result = sparsecc.compile_model(mlp_path, with_scores(default_pipeline(sparsity=sparsity, mode=mode)),
                                    mlp_feeds(24, seed=10), out=out)
    model = model_io.load_model(out / "model.onnx")
    assert all(node.inputs[1].const_value.numpy().shape == ops.score_scale(node).shape for node in thresholds(model))
    measured = OrtBackend().evaluate(model, IterableFeeds(held_out))
    calib = next(p["details"] for p in result.report["passes"] if p["pass"] == "calibrate-thresholds")
    assert all("weight-aware" in row["score"] for row in calib["thresholds"])
    if mode == "uniform":
        for row in measured["sites"]:
            if row["thresholded"]:
                assert abs(row["sparsity"] - sparsity) <= 0.02, row
    else:
        assert abs(measured["macs"]["body"]["sparsity"] - sparsity) <= 0.02
        assert abs(calib["calibrated_model_sparsity"] - sparsity) <= 0.005


# Equal norms: the same zeros as magnitude ------------------------------------------------------

def equal_norm_model(dim: int = 16) -> onnx.ModelProto:
    """x -> gate/up (one shared threshold) -> down -> head, with weights of random sign whose rows
    have exactly equal L2 norms per threshold: gate +-0.5 and up +-1 on 12 of its 16 columns
    (shared: sqrt(16 x 0.25 + 12) = 4), down +-1 (sqrt(16) = 4)."""
    b = Builder(7)

    def signs(value, columns=dim):
        return (b.rng.choice([-value, value], size=(dim, dim)) * (np.arange(dim) < columns)).astype(np.float32)

    gate = b.op("MatMul", ["x", b.const("w_gate", signs(0.5))], name="gate")
    up = b.op("MatMul", ["x", b.const("w_up", signs(1.0, columns=12))], name="up")
    a = b.op("Mul", [b.op("Tanh", [gate]), up])
    r = b.op("Add", ["x", b.op("MatMul", [a, b.const("w_down", signs(1.0))], name="down")])
    y = b.op("MatMul", [r, b.weight("w_head", (dim, 4))], name="head")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])
    return b.model([x], {"y": (y, ["n", 4])})


def test_equal_norms_give_the_zeros_of_magnitude_thresholds():
    """With every c_i = 4 the score is 4|x|: a histogram shifted by two octaves, so tau = 4t and
    t_i = tau / 4 = t exactly: the same thresholds, zeros and outputs as magnitude ones."""
    feeds = mlp_feeds(8, dim=16, seed=2)
    models = {}
    for scored in (False, True):
        model = models[scored] = to_ir(equal_norm_model())
        passes = [get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.5)]
        run(model, with_scores(passes) if scored else passes, feeds)
    for magnitude, scored in zip(thresholds(models[False]), thresholds(models[True])):
        assert np.array_equal(ops.score_scale(scored), np.full(16, 4.0, np.float32))
        t = magnitude.inputs[1].const_value.numpy()
        assert t.shape == () and t > 0
        assert np.array_equal(scored.inputs[1].const_value.numpy(), np.full(16, t))
    a, b = threshold_outputs(models[False], feeds), threshold_outputs(models[True], feeds)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert 0.3 < np.mean([np.mean(a[n.outputs[0].name] == 0) for n in thresholds(models[False])]) < 0.7


# Every threshold method --------------------------------------------------------------------------

def llama_feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(n)]


def body_sparsity(model, feeds):
    measured = OrtBackend().evaluate(model, IterableFeeds(feeds))
    return measured["macs"]["body"]["sparsity"]


@pytest.mark.parametrize("method, options", [
    ("calibrate-thresholds", {"sparsity": 0.5}),
    ("allocate-sparsity", {"sparsity": 0.5, "step": 0.1, "windows": 6}),
    ("sequential-search", {"loss_inc": 1.05, "step": 0.3, "windows": 2}),
])
def test_every_threshold_method_sets_weight_aware_thresholds(method, options):
    """On the tiny Llama: each method calibrates on the scores and writes t = tau / c; its
    reported model-wide sparsity is what ORT measures on the calibration data."""
    model = to_ir(llama_model())
    reports = run(model, [get("insert-thresholds")(), get("weight-scores")(), get(method)(**options)], llama_feeds())
    details = reports[-1].details
    for node in thresholds(model):
        t, scale = node.inputs[1].const_value.numpy(), ops.score_scale(node)
        assert t.shape == scale.shape and np.all(t > 0)
        np.testing.assert_allclose(t * scale, ops.threshold_level(node), rtol=1e-6)   # one tau per threshold
    claimed = details["calibrated_model_sparsity"]
    if method != "sequential-search":
        assert claimed == pytest.approx(0.5, abs=0.005)
    assert body_sparsity(model, llama_feeds()) == pytest.approx(claimed, abs=0.03)


def test_statistics_are_of_the_score_and_cached_under_its_scale(tmp_path):
    """collect takes a threshold's score name: the histogram of |x_i| c_i, cached under a key
    holding the scale (another exponent: another entry)."""
    feeds = save_npz(mlp_feeds(4, rows=16), tmp_path / "calib.npz")
    source = as_feed_source(sparsecc.data_source(feeds))
    hists = []
    for exponent in (1.0, 0.5):
        model = to_ir(mlp_model())
        run(model, [get("insert-thresholds")(), get("weight-scores")(exponent=exponent)], None)
        node = thresholds(model)[0]
        name = statistic(node)
        assert name == f"score:{node.name}"
        hists.append(collect(model, [name, node.inputs[0].name], source, tmp_path / "cache"))
        x = np.concatenate([f["x"] for f in mlp_feeds(4, rows=16)])
        expected = AbsHistogram()
        expected.add(np.abs(x) * ops.score_scale(node))
        assert np.array_equal(hists[-1][name].counts, expected.counts)
    assert len(list((tmp_path / "cache").glob("hist-*.npz"))) == 2
    assert np.array_equal(hists[0]["x"].counts, hists[1]["x"].counts)
    assert not np.array_equal(hists[0][f"score:{node.name}"].counts, hists[1][f"score:{node.name}"].counts)


def test_quantize_activations_raises_each_channel_to_the_zero_band():
    model = to_ir(llama_model())
    passes = [get("insert-thresholds")(), get("weight-scores")(), get("calibrate-thresholds")(sparsity=0.1, refine=0)]
    run(model, passes, llama_feeds())
    before = {n.name: n.inputs[1].const_value.numpy().copy() for n in thresholds(model)}
    report = run(model, [get("quantize-activations")(max_error=1.0)], llama_feeds())[0].details
    raised = [row for row in report["activations"] if row["threshold_raised_to"] is not None]
    assert raised
    for node in thresholds(model):
        t = node.inputs[1].const_value.numpy()
        row = next((r for r in raised if r["tensor"] == node.outputs[0].name), None)
        floor = np.float32(row["threshold_raised_to"]) if row else np.float32(0)
        assert np.array_equal(t, np.maximum(before[node.name], floor))
    with ort_session(model) as session:
        assert np.isfinite(session.run(None, llama_feeds(1)[0])[0]).all()


# seneca ----------------------------------------------------------------------------------------

def seneca_compiled(tmp_path, scored: bool):
    path = save(llama_model(), tmp_path / "model.onnx")
    out = tmp_path / ("wina" if scored else "magnitude")
    passes = default_pipeline(sparsity=0.5)
    sparsecc.compile_model(path, with_scores(passes) if scored else passes, llama_feeds(4), out=out, target="seneca")
    return out, model_io.load_model(out / "model.onnx")


def test_seneca_compiles_costs_and_simulates_per_channel_thresholds_as_ort_runs_them(tmp_path):
    out, model = seneca_compiled(tmp_path, scored=True)
    report = simulate(out, as_feed_source(llama_feeds(2, seed=1)))
    pinned = report["vs_ort"]["with_ort_decisions"]
    assert pinned["threshold_decisions"] > 0 and pinned["argmax_agreement"] >= 0.9
    assert pinned["largest_relative_margin_at_difference"] <= 0.02           # differences are near ties
    assert pinned["simulator_mac_lane_ops"] == report["vs_ort"]["ort_effective_macs"]
    assert pinned["max_abs_logit_diff"] <= 0.01 * pinned["max_abs_logit"]
    # Costs against the magnitude model on the same graph: each Threshold's t is in data memory
    # (2 bytes a channel instead of one) and loaded once per 8-lane group, per token.
    _, magnitude = seneca_compiled(tmp_path, scored=False)
    memory = {}
    for name, m in (("wina", model), ("magnitude", magnitude)):
        memory[name] = json.loads(m.metadata_props["sparsecc.placement"])["memory"]
    constants = {k: sum(core["constants"] for core in v.values()) for k, v in memory.items()}
    widths = [n.inputs[1].const_value.numpy().size for n in thresholds(model)]
    assert constants["wina"] - constants["magnitude"] == 2 * sum(w - 1 for w in widths)
    feed = llama_feeds(1)[0]
    tokens = feed["input_ids"].size
    sims = {name: Simulator(m, load_target("seneca")) for name, m in (("wina", model), ("magnitude", magnitude))}
    for sim in sims.values():
        sim.run(feed)
    for node, width in zip(thresholds(model), widths):
        wina, plain = (sims[k].work[node.name][0].counts for k in ("wina", "magnitude"))
        groups = -(-width // 8)
        assert wina["MLD"] - plain["MLD"] == groups * tokens and wina["ADDI"] - plain["ADDI"] == groups * tokens


# Determinism and bad config ----------------------------------------------------------------------

def test_same_inputs_give_byte_identical_outputs(mlp_path, tmp_path):
    feeds = mlp_feeds(6, seed=3)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        sparsecc.compile_model(mlp_path, with_scores(default_pipeline(sparsity=0.55)), feeds, out=out)
    a, b = (listing(out) for out in outs)
    a.pop("timings.json")
    b.pop("timings.json")
    assert a == b
    assert "weight-scores" in json.loads(a["report.json"])["passes"][2]["pass"]


@pytest.mark.parametrize("exponent", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_exponent(exponent):
    with pytest.raises(SparseccError, match="exponent must be a positive number"):
        get("weight-scores")(exponent=exponent)


def test_needs_thresholds_and_must_come_before_they_are_set():
    model = to_ir(mlp_model())
    with pytest.raises(PreconditionError, match="pipeline order: weight-scores needs Threshold ops, which no pass before it provides; put insert-thresholds before it"):
        run(model, [get("weight-scores")()], None)
    run(model, [get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.5, refine=0)], mlp_feeds(2))
    with pytest.raises(PreconditionError, match="pipeline order: weight-scores must run before thresholds set to a "
                                                "sparsity and the model's are set already"):
        run(model, [get("weight-scores")()], None)


def test_a_score_of_no_weight_aware_threshold_is_an_error():
    model = to_ir(mlp_model())
    run(model, [get("insert-thresholds")()], None)
    with pytest.raises(SparseccError, match="names no weight-aware Threshold .*run weight-scores"):
        collect(model, [f"score:{thresholds(model)[0].name}"], as_feed_source(mlp_feeds(1)))
