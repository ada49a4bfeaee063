"""compensate-lowrank (R-Sparse): the dropped part of every thresholded site through a rank-r
SVD factor of its weight. Exact where it must be (t = 0; full rank), better with more rank,
paid for out of the model-wide MAC budget (calibration, searches, eval), run and costed by
the seneca simulator."""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import (SAMPLE, SAMPLE_MODEL, TEST_TXT, VALID_TXT, float32_target, gpt2_model, llama_model, mlp_feeds,
                      mlp_model, save, to_ir)

import sparsecc
from sparsecc import cli, compensation, model_io, ops
from sparsecc.backends.seneca.simulator import Simulator
from sparsecc.data import as_feed_source
from sparsecc.errors import PreconditionError, SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.passes.compensate_lowrank import lowrank_factors
from sparsecc.runtime import ort_session
from sparsecc.sites import analyze
from sparsecc.threshold_search import model_sparsity, thresholds_by_role


def llama_feeds(n=6, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 24, (1, seq)).astype(np.int64)} for _ in range(n)]


def gpt2_feeds(n=4, seq=12, dim=16):
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((seq, dim)).astype(np.float32)} for _ in range(n)]


def run_passes(model, passes, feeds=None):
    return PassManager(passes).run(model, Context(calibration=as_feed_source(feeds) if feeds else None))


def outputs(model, feeds, names=None):
    """ORT as the graph is written (its DequantizeLinear + MatMul fusion would quantize activations)."""
    with ort_session(model, names or [], optimize=False) as session:
        wanted = [o.name for o in session.get_outputs()] if names else [session.get_outputs()[0].name]
        return [dict(zip(wanted, session.run(wanted, feed))) for feed in feeds]


def first_output(model, feeds):
    return [next(iter(o.values())) for o in outputs(model, feeds)]


# Structure ----------------------------------------------------------------------------------------

def test_factors_are_recognised_by_structure_and_never_thresholded():
    model = to_ir(llama_model())
    run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=4)])
    sites = analyze(model.graph).sites
    factors = [s for s in sites if s.compensates is not None]
    body = [s for s in sites if s.compensates is None and not s.head]
    assert len(factors) == 2 * len(body) == 14
    assert {s.factor for s in factors} == {1, 2} and all(s.group == -1 and not s.head for s in factors)
    assert all(s.in_features == 4 for s in factors if s.factor == 2)
    assert len(analyze(model.graph).groups()) == 5   # q/k/v, o, gate/up, down, head: none of their own
    # a second insert-thresholds leaves them alone; a second compensate-lowrank changes nothing
    before = str(model)
    report = run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=4)])
    assert not report[0].changed and not report[1].changed and str(model) == before
    assert {d["reason"] for d in report[1].details["declined"]} == {"already compensated"}


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_factors_are_the_truncated_svd_with_a_fixed_sign(shape):
    w = np.random.default_rng(5).standard_normal(shape)
    b, a, error = lowrank_factors(w, 3)
    assert b.shape == (shape[0], 3) and a.shape == (3, shape[1])
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(b @ a, best, atol=1e-10)                     # the best rank-3 approximation
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.sqrt(s[:3]))   # split evenly
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.sqrt(s[:3]))
    factor = b if shape[0] <= shape[1] else a.T
    assert all(factor[np.argmax(np.abs(factor[:, i])), i] > 0 for i in range(3))
    assert error == pytest.approx(np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum()))
    b, a, error = lowrank_factors(w, min(shape))
    np.testing.assert_allclose(b @ a, w, atol=1e-12)
    assert error < 1e-12
    b, a, _ = lowrank_factors(np.outer(np.arange(1.0, shape[0] + 1), np.ones(shape[1])), min(shape))
    assert np.all(np.isfinite(b)) and np.all(np.isfinite(a))   # rank 1 of many: zero singular values are safe


def test_same_inputs_same_bytes(tmp_path):
    path = save(llama_model(), tmp_path / "m.onnx")
    for out in ("a", "b"):
        passes = [get("insert-thresholds")(), get("compensate-lowrank")(rank=3), get("calibrate-thresholds")(sparsity=0.5)]
        sparsecc.compile_model(path, passes, llama_feeds(), out=tmp_path / out)
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert (tmp_path / "a" / "report.json").read_bytes() == (tmp_path / "b" / "report.json").read_bytes()


# Exactness ---------------------------------------------------------------------------------------

def test_zero_thresholds_leave_the_outputs_unchanged():
    plain, compensated = to_ir(llama_model()), to_ir(llama_model())
    run_passes(plain, [get("insert-thresholds")()])
    run_passes(compensated, [get("insert-thresholds")(), get("compensate-lowrank")(rank=4)])
    for a, b in zip(first_output(plain, llama_feeds()), first_output(compensated, llama_feeds())):
        np.testing.assert_array_equal(a, b)   # d = 0 exactly: y + (0 @ B) @ A = y


@pytest.mark.parametrize("build, feeds", [(llama_model, llama_feeds), (gpt2_model, gpt2_feeds)])
def test_full_rank_gives_the_dense_model_at_any_threshold(build, feeds):
    """r = min(in, out): B @ A = W, so Threshold(x) @ W + (x - Threshold(x)) @ B @ A = x @ W. The GPT-2
    block covers Gemm with bias, Gemm transB, a float16 weight through Cast and int8 through DequantizeLinear."""
    dense, model = to_ir(build()), to_ir(build())
    report = run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=10_000),
                                get("calibrate-thresholds")(sparsity=0.7, mode="uniform")], feeds())
    rows = report[1].details["compensated"]
    assert rows and all(r["relative_error"] < 1e-6 for r in rows)
    assert all(float(n.inputs[1].const_value.numpy()) > 0 for n in model.graph if ops.is_threshold(n))
    for got, ref in zip(first_output(model, feeds()), first_output(dense, feeds())):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _error_at(rank, feeds):
    """Mean squared error of the tiny Llama's logits against the dense model's, thresholds at
    70% each (from dense statistics, so the same for every rank), compensation of `rank`."""
    model = to_ir(llama_model())
    passes = [get("insert-thresholds")()] + ([get("compensate-lowrank")(rank=rank)] if rank else [])
    run_passes(model, passes + [get("calibrate-thresholds")(sparsity=0.7, mode="uniform", refine=0)], feeds)
    dense = first_output(to_ir(llama_model()), feeds)
    thresholds = sorted(float(n.inputs[1].const_value.numpy()) for n in model.graph if ops.is_threshold(n))
    return float(np.mean([np.mean((a - b) ** 2) for a, b in zip(first_output(model, feeds), dense)])), thresholds


def test_error_does_not_grow_with_rank():
    feeds = llama_feeds(8)
    errors, thresholds = zip(*[_error_at(r, feeds) for r in (0, 1, 2, 4, 8, 16)])
    assert all(t == thresholds[0] for t in thresholds)
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0 and errors[-1] < 1e-9 * errors[0]   # rank 16 of 16-wide weights: the dense model


def test_site_error_is_monotone_in_rank_exactly():
    """At a site reading the graph input the dropped part d is the same for every rank, and
    ||d (W - B_r A_r)||^2 = sum over i > r of s_i^2 (d . u_i)^2 shrinks with r for every token."""
    feeds = mlp_feeds(2, rows=16)
    x = np.concatenate([f["x"] for f in feeds])
    w = next(v for v in to_ir(mlp_model()).graph.initializers.values() if v.name == "w_gate").const_value.numpy()
    errors = []
    for rank in (1, 2, 4, 8, 16, 32):
        model = to_ir(mlp_model())
        run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=rank),
                           get("calibrate-thresholds")(sparsity=0.6, mode="uniform", refine=0)], feeds)
        gate = next(n for n in analyze(model.graph).nodes if n.name == "gate")
        added = next(user for user, _ in gate.outputs[0].uses() if user.op_type == "Add")
        got = np.concatenate([o[added.outputs[0].name] for o in outputs(model, feeds, [added.outputs[0].name])])
        errors.append(np.sum((got - x @ w) ** 2, axis=1))
    for a, b in zip(errors, errors[1:]):
        assert np.all(b <= a * (1 + 1e-5) + 1e-9)
    assert errors[0].sum() > 0 and errors[-1].sum() < 1e-8 * errors[0].sum()


# MAC accounting ----------------------------------------------------------------------------------

def test_calibration_pays_for_the_compensation():
    """At a mac-weighted target the thresholds go higher with compensation, and the model-wide
    figure counts factor 1 at the non-zeros of d (the level) and factor 2 dense."""
    feeds = llama_feeds()
    plain, model = to_ir(llama_model()), to_ir(llama_model())
    base = run_passes(plain, [get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.5)], feeds)[-1].details
    details = run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=2),
                                 get("calibrate-thresholds")(sparsity=0.5)], feeds)[-1].details
    assert details["calibrated_model_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert details["level"] > base["level"] + 0.02
    sites = analyze(model.graph).sites
    level = {r["threshold"]: r["calibrated_sparsity"] for r in details["thresholds"]}
    dense = sum(s.macs_per_token for s in sites if s.threshold is not None)
    effective = sum(s.macs_per_token * (1 - level[s.threshold]) for s in sites if s.threshold is not None)
    effective += sum(s.macs_per_token * (level[s.compensates] if s.factor == 1 else 1.0)   # no exact zeros here
                     for s in sites if s.compensates is not None)
    assert details["calibrated_model_sparsity"] == pytest.approx(1 - effective / dense, abs=1e-6)


def test_search_budget_counts_the_compensation():
    model = to_ir(llama_model())
    run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=2)])
    thresholds, natural = thresholds_by_role(model)
    costs = compensation.by_threshold(analyze(model.graph).sites)
    gate_up = next(th for th in thresholds if th.role == ((16, 40), (16, 40)))
    assert gate_up.compensation == costs[gate_up.node.name] == compensation.Compensation(2 * 16 * 2, 2 * 2 * 40)
    hists = {th.source: _Zeros(0.0) for th in thresholds}
    levels = dict.fromkeys({th.group for th in thresholds}, 0.6)
    total = sum(th.macs for th in thresholds)
    extra = sum(th.compensation.sparse_macs * 0.6 + th.compensation.dense_macs for th in thresholds)
    assert model_sparsity(thresholds, natural, hists, levels) == pytest.approx(0.6 - extra / total)


class _Zeros:
    def __init__(self, zeros):
        self.zeros = zeros


def test_allocate_sparsity_meets_the_target_with_compensation():
    model = to_ir(llama_model())
    report = run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=2),
                                get("allocate-sparsity")(sparsity=0.5, step=0.1, windows=2)], llama_feeds())
    details = report[-1].details
    assert details["calibrated_model_sparsity"] == pytest.approx(0.5, abs=1e-6)
    # one level for all gets there only above 0.5 (the compensation is paid for)
    assert max(g["sparsity"] for g in details["groups"]) > 0.5


def test_eval_measures_the_compensation_against_the_dense_baseline(tmp_path):
    """On the bundled sample: calibrated at 50% with compensation, eval's measured effective-MAC
    sparsity (compensation factors counted from their measured inputs) is 50%."""
    text = sparsecc.data_source(VALID_TXT, tokenizer=SAMPLE, windows=6, seq_len=64)
    calib = as_feed_source(list(text.feeds(["input_ids"])))   # tokenized once
    passes = [get("insert-thresholds")(), get("compensate-lowrank")(rank=8), get("calibrate-thresholds")(sparsity=0.5)]
    result = sparsecc.compile_model(SAMPLE_MODEL, passes, calib, out=tmp_path / "out")
    assert result.report["passes"][-1]["details"]["level"] > 0.52
    measured = sparsecc.evaluate(tmp_path / "out" / "model.onnx", calib)["result"]
    rows = measured["sites"]
    factors = [r for r in rows if r["compensates"] is not None]
    assert len(factors) == 2 * sum(1 for r in rows if r["thresholded"])
    body = measured["macs"]["body"]
    assert body["dense_per_token"] == sum(r["macs_per_token"] for r in rows if not r["head"] and not r["compensates"])
    assert body["effective_per_token"] == pytest.approx(sum(r["effective_macs_per_token"] for r in rows if not r["head"]))
    assert body["sparsity"] == pytest.approx(0.5, abs=0.02)
    # factor 1 reads d, sparse where the threshold keeps x; factor 2 reads a dense r-vector
    assert all(0.3 < r["sparsity"] < 0.7 for r in factors if r["tensor"].endswith(".dropped.out"))
    assert all(r["sparsity"] < 0.01 for r in factors if not r["tensor"].endswith(".dropped.out"))


# seneca -----------------------------------------------------------------------------------------

def compensated_seneca(tmp_path, rank=4):
    path = save(llama_model(), tmp_path / "model.onnx")
    passes = [get("insert-thresholds")(), get("compensate-lowrank")(rank=rank), get("calibrate-thresholds")(sparsity=0.5)]
    sparsecc.compile_model(path, passes, llama_feeds(4), out=tmp_path / "out", target="seneca")
    return tmp_path / "out", model_io.load_model(tmp_path / "out" / "model.onnx")


def test_seneca_runs_the_factors_as_event_driven_sites(tmp_path):
    """32-bit values: the simulator equals ORT, and its MAC lane-ops are ORT's effective MACs,
    the factors' included (d's zeros send no event)."""
    _, model = compensated_seneca(tmp_path)
    analysis = analyze(model.graph)
    sim = Simulator(model, float32_target(tmp_path))
    factors = {s.node for s in analysis.sites if s.compensates}
    assert factors <= set(sim.tiles)
    tensors = sorted({s.consumes for s in analysis.sites})
    with ort_session(model, tensors, optimize=False) as session:
        names = [o.name for o in session.get_outputs()]
        for feed in llama_feeds(2):
            got = dict(zip(names, session.run(names, feed)))
            result = sim.run(feed)
            ref = got[names[0]]
            np.testing.assert_allclose(result.outputs[names[0]], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
            macs = {s.node: int(np.count_nonzero(got[s.consumes])) * s.out_features for s in analysis.sites}
            assert result.mac_lane_ops == sum(macs.values())
            assert result.compensation_mac_lane_ops == sum(macs[n] for n in factors) > 0
            assert result.compensation_pj and sum(result.compensation_pj.values()) > 0


def test_seneca_simulate_reports_the_compensation_and_agrees_with_ort(tmp_path, capsys):
    out, model = compensated_seneca(tmp_path)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, input_ids=np.stack([f["input_ids"] for f in llama_feeds(3, seed=1)]))
    assert cli.main(["simulate", str(out), "--text", str(feeds), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sparse, dense = report["sparse"], report["dense"]
    c = sparse["compensation"]
    assert 0 < c["energy_share"] < 1 and 0 < c["mac_lane_ops"] < sparse["mac_lane_ops"]
    assert c["energy_pj_per_token"]["total"] < sparse["energy_pj_per_token"]["total"]
    # the dense baseline is the model without compensation and without thresholds
    assert "compensation" not in dense
    body_and_head = sum(s.macs_per_token for s in analyze(model.graph).sites if s.compensates is None)
    assert dense["mac_lane_ops"] == dense["dense_macs"] == sparse["dense_macs"] == body_and_head * report["tokens"]
    pinned = report["vs_ort"]["with_ort_decisions"]
    assert pinned["argmax_agreement"] == 1.0 and report["vs_ort"]["argmax_agreement"] >= 0.9
    assert abs(pinned["mac_difference"]) < 0.005
    assert "low-rank compensation" in (out / "simulation" / "report.md").read_text()


# Bad configuration ---------------------------------------------------------------------------------

def test_bad_rank():
    with pytest.raises(SparseccError, match="rank must be at least 1"):
        get("compensate-lowrank")(rank=0)


def test_needs_thresholds():
    with pytest.raises(PreconditionError, match="pipeline order: compensate-lowrank needs Threshold ops, which no pass before it provides; put insert-thresholds before it"):
        run_passes(to_ir(llama_model()), [get("compensate-lowrank")()])


def test_unreachable_target_is_an_error_not_a_silent_miss():
    """Full rank costs more than the site it compensates: no level meets a 50% MAC budget."""
    model = to_ir(llama_model())
    with pytest.raises(SparseccError, match="out of reach.*compensation rank"):
        run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=16),
                           get("calibrate-thresholds")(sparsity=0.5)], llama_feeds())


def test_heads_are_declined_with_a_reason():
    model = to_ir(llama_model())
    report = run_passes(model, [get("insert-thresholds")(include_head=True), get("compensate-lowrank")(rank=2)])
    assert {"site": "lm_head", "reason": "a head stays as it is"} in report[1].details["declined"]
    assert report[1].details["sites"] == 7
    head = [s for s in analyze(model.graph).sites if s.head]
    assert [s.node for s in head] == ["lm_head"]


def test_warns_when_thresholds_are_already_calibrated():
    model = to_ir(llama_model())
    report = run_passes(model, [get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.5),
                                get("compensate-lowrank")(rank=2)], llama_feeds())
    assert "calibrate or search them again" in report[-1].details["warning"]


def test_float16_model_gets_float16_factors():
    from conftest import Builder
    from onnx import TensorProto, helper

    b = Builder(6)
    hidden = b.op("Tanh", [b.op("MatMul", ["x", b.weight("w1", (8, 6), np.float16)], name="inner")])
    y = b.op("MatMul", [hidden, b.weight("w2", (6, 3), np.float16)], name="head")
    proto = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["r", 8])], {"y": (y, ["r", 3])},
                    elem=TensorProto.FLOAT16)
    model, dense = to_ir(proto), to_ir(proto)
    feeds = [{"x": np.random.default_rng(i).standard_normal((5, 8)).astype(np.float16)} for i in range(3)]
    run_passes(model, [get("insert-thresholds")(), get("compensate-lowrank")(rank=6),
                       get("calibrate-thresholds")(sparsity=0.5, mode="uniform")], feeds)
    factors = [v for name, v in model.graph.initializers.items() if ".lowrank." in name]
    assert len(factors) == 2 and all(v.const_value.dtype == ir.DataType.FLOAT16 for v in factors)
    for got, ref in zip(first_output(model, feeds), first_output(dense, feeds)):   # full rank: the dense model
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=0.02)


def test_factorizations_run_blas_on_one_thread_and_restore_it(monkeypatch):
    """Many small eigendecompositions on busy cores: BLAS on one thread while factoring, restored after."""
    from threadpoolctl import threadpool_info

    import sparsecc.passes.compensate_lowrank as module

    seen = []
    real = np.linalg.eigh

    def spy(a, *args, **kwargs):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real(a, *args, **kwargs)

    before = [i["num_threads"] for i in threadpool_info()]
    monkeypatch.setattr(module.np.linalg, "eigh", spy)
    weight = np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32)
    module.lowrank_factors(weight, 4)
    assert seen and all(threads == {1} for threads in seen)
    assert [i["num_threads"] for i in threadpool_info()] == before
