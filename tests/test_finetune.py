"""finetune-bands and the PyTorch evaluator under it: the evaluator equals ONNX Runtime, the
straight-through gradient points the right way, fine-tuning lowers the loss at the same
model-wide sparsity, and the run is deterministic, resumable and fails clearly."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import (SAMPLE, SAMPLE_MODEL, VALID_TXT, Builder, bert_model, gpt2_model, linear_model, llama_model,
                      mlp_feeds, mlp_model, to_ir)
from onnx import TensorProto, helper

import sparsecc
from sparsecc import model_io, ops
from sparsecc.band_training import ste_threshold
from sparsecc.calibration import collect
from sparsecc.data import as_feed_source
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.runtime import ort_session
from sparsecc.threshold_search import Checkpoint, thresholds_by_role
from sparsecc.torch_eval import TorchGraph

# torch makes its compile-cache folder in the temp folder when torch._dynamo is first imported
# (torch.use_deterministic_algorithms, which the pass calls, imports it): import it now, before
# each test's private temp folder is checked for leftovers
import torch._dynamo  # noqa: E402,F401


def token_feeds(n=6, seq=12, vocab=24, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]


def float_feeds(n=4, rows=7, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, dim)).astype(np.float32)} for _ in range(n)]


def thresholded(model: ir.Model, feeds, *more, sparsity=0.5) -> ir.Model:
    PassManager([get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=sparsity), *more]).run(
        model, Context(calibration=as_feed_source(feeds)))
    return model


def worst_relative_error(model: ir.Model, feeds) -> float:
    """max |torch - ORT| over every output, relative to the output's peak (at least 1)."""
    graph = TorchGraph(model)
    worst = 0.0
    with ort_session(model, optimize=False) as session:   # ORT's fusions would quantize DQ+MatMul inputs
        for feed in feeds:
            with torch.no_grad():
                ours = graph.run(feed)
            for ref, out in zip(session.run(None, feed), ours):
                worst = max(worst, float(np.abs(ref - out.numpy()).max() / max(1.0, np.abs(ref).max())))
    return worst


# The evaluator ---------------------------------------------------------------------------------

TINY = {"llama": (llama_model, token_feeds), "gpt2": (gpt2_model, float_feeds), "bert": (bert_model, float_feeds),
        "mlp": (mlp_model, lambda: mlp_feeds(4, rows=16))}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("with_thresholds", [False, True])
def test_torch_evaluator_equals_onnx_runtime_on_the_tiny_models(name, with_thresholds):
    build, make_feeds = TINY[name]
    model = to_ir(build())
    if with_thresholds:
        thresholded(model, make_feeds())
        assert any(ops.is_threshold(n) and ops.threshold_level(n) > 0 for n in model.graph)
    assert worst_relative_error(model, make_feeds()) <= 1e-5   # float32 rounding


def test_torch_evaluator_equals_onnx_runtime_on_the_sample():
    feeds = token_feeds(3, seq=48, vocab=2048)
    model = thresholded(model_io.load_model(SAMPLE_MODEL), feeds)
    assert worst_relative_error(model, feeds) <= 1e-5
    # int8 weights and activations (Q/DQ): a float32 difference upstream may flip one rounding
    # of an activation quantizer, one quantum, so the bound is looser
    quantized = thresholded(model_io.load_model(SAMPLE_MODEL), feeds, get("quantize-weights")(),
                            get("quantize-activations")())
    assert worst_relative_error(quantized, feeds) <= 1e-2


def test_an_unsupported_op_is_named():
    b = Builder()
    y = b.op("HardSwish", [b.op("MatMul", ["x", b.weight("w", (4, 4))], name="linear")])
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", 4])], {"y": (y, ["r", 4])})
    with pytest.raises(SparseccError, match="does not support op HardSwish"):
        TorchGraph(to_ir(model))


# The estimator ---------------------------------------------------------------------------------

def test_ste_gradient_points_toward_the_best_band():
    """y = Threshold(x, t) @ W fitted to the output of the band t* = 0.8: below t* raising t
    lowers the loss, above it raises it. The STE gradient must say so (its forward is exact)."""
    model = to_ir(linear_model(k=64, n=8))
    PassManager([get("insert-thresholds")(include_head=True)]).run(model, Context())   # its one site is a head
    node = next(n for n in model.graph if ops.is_threshold(n))
    graph = TorchGraph(model)
    x = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
    w = torch.from_numpy(graph.constants["w"].numpy())
    target = torch.where(torch.from_numpy(x).abs() > 0.8, torch.from_numpy(x), 0.0) @ w

    def gradient(t: float) -> float:
        level = torch.tensor([t], dtype=torch.float64, requires_grad=True)
        threshold = ste_threshold({node.name: 0}, level, torch.tensor([0.2 * 0.67]), [None])
        out = graph.run({"x": x}, threshold)[0]
        hard = torch.from_numpy(np.where(np.abs(x) > np.float32(t), x, 0)) @ w
        assert torch.equal(out.detach(), hard)                                # the forward is the op
        ((out - target) ** 2).mean().backward()
        return float(level.grad)

    assert gradient(0.4) < 0 < gradient(1.4)


# The pass ---------------------------------------------------------------------------------------

def body_sparsity(model: ir.Model, feeds) -> float:
    """Model-wide MAC-weighted sparsity measured with the thresholds in place."""
    thresholds, natural = thresholds_by_role(model)
    hists = collect(model, [th.source for th in thresholds] + [s.consumes for s in natural], as_feed_source(feeds))
    zeroed = sum(th.macs * hists[th.source].sparsity_at(ops.threshold_level(th.node)) for th in thresholds)
    zeroed += sum(s.macs_per_token * hists[s.consumes].zeros for s in natural)
    return zeroed / (sum(th.macs for th in thresholds) + sum(s.macs_per_token for s in natural))


def cross_entropy(model: ir.Model, feeds) -> float:
    with ort_session(model) as session:
        total = 0.0
        for feed in feeds:
            logits = session.run(None, feed)[0][:, :-1].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            total += -np.take_along_axis(logp, feed["input_ids"][:, 1:, None], axis=-1).mean()
    return total / len(feeds)


def test_finetuning_lowers_the_loss_at_the_same_model_wide_sparsity():
    """The bundled sample on WikiText-2 valid windows: measured with ORT, the fine-tuned model
    has a lower cross-entropy on its calibration windows at the sparsity it had before."""
    calib = sparsecc.data_source(VALID_TXT, SAMPLE, 64, 12)
    feeds = list(calib.feeds(["input_ids"]))
    model = thresholded(model_io.load_model(SAMPLE_MODEL), calib)
    before = (cross_entropy(model, feeds[:8]), body_sparsity(model, feeds))
    report = PassManager([get("finetune-bands")(steps=24, windows=8)]).run(model, Context(calibration=calib))[-1].details
    after = (cross_entropy(model, feeds[:8]), body_sparsity(model, feeds))
    assert report["loss"]["before"] == pytest.approx(before[0], abs=1e-4)    # the report's losses are ORT's
    assert report["loss"]["after"] == pytest.approx(after[0], abs=1e-4)
    assert report["calibrated_model_sparsity"] == pytest.approx(report["target"], abs=1e-6)
    assert after[1] == pytest.approx(before[1], abs=2e-3)
    assert after[0] < before[0] - 0.005
    assert report["loss"]["after"] < report["loss"]["before"] and report["loss"]["kind"] == "cross-entropy"
    assert report["training"]["tokens"] == 24 * 64 and report["training"]["backward_passes"] == 24
    moved = [r for r in report["thresholds"] if r["sparsity_after"] != r["sparsity_before"]]
    assert len(moved) == len(report["thresholds"])                            # every band was learned


def finetuned(cache_dir=None, **options):
    feeds = token_feeds()
    model = thresholded(to_ir(llama_model()), feeds)
    details = PassManager([get("finetune-bands")(**options)]).run(
        model, Context(calibration=as_feed_source(feeds), cache_dir=cache_dir))[-1].details
    return model, details


def thresholds_of(model: ir.Model) -> list[bytes]:
    return [n.inputs[1].const_value.numpy().tobytes() for n in model.graph if ops.is_threshold(n)]


def test_deterministic_and_resumable(tmp_path, monkeypatch):
    options = dict(steps=6, windows=4, batch=2, seed=3)
    model, plain = finetuned(**options)
    again, _ = finetuned(**options)
    assert model_io_bytes(model) == model_io_bytes(again)                      # byte-identical model
    saves = []
    real_save = Checkpoint.save

    def interrupted(self, levels, history):
        real_save(self, levels, history)
        saves.append(len(history))
        if len(history) == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(Checkpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetuned(tmp_path, **options)
    monkeypatch.setattr(Checkpoint, "save", real_save)
    resumed, details = finetuned(tmp_path, **options)
    assert details["training"]["resumed_at"] == 4 and details["training"]["backward_passes"] == 2 * 2
    assert thresholds_of(resumed) == thresholds_of(model)                       # as if never interrupted
    assert details["history"] == plain["history"] and list(tmp_path.glob("finetune-*.json"))
    other, _ = finetuned(**(options | {"seed": 4}))
    assert thresholds_of(other) != thresholds_of(model)


def model_io_bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def test_a_float_input_model_trains_on_the_dense_outputs():
    feeds = mlp_feeds(6, rows=16)
    model = thresholded(to_ir(mlp_model()), feeds)
    details = PassManager([get("finetune-bands")(steps=8, windows=4)]).run(
        model, Context(calibration=as_feed_source(feeds)))[-1].details
    assert details["loss"]["kind"] == "squared-error"
    assert details["calibrated_model_sparsity"] == pytest.approx(details["target"], abs=1e-6)
    assert details["target"] == pytest.approx(0.5, abs=0.02)


def test_weight_aware_thresholds_learn_their_score_level():
    feeds = token_feeds()
    model = to_ir(llama_model())
    PassManager([get("insert-thresholds")(), get("weight-scores")(), get("calibrate-thresholds")(sparsity=0.5)]).run(
        model, Context(calibration=as_feed_source(feeds)))
    assert worst_relative_error(model, feeds) <= 1e-5                         # vector t in the evaluator
    before = {n.name: ops.threshold_level(n) for n in model.graph if ops.is_threshold(n)}
    details = PassManager([get("finetune-bands")(steps=6, windows=4)]).run(
        model, Context(calibration=as_feed_source(feeds)))[-1].details
    assert details["calibrated_model_sparsity"] == pytest.approx(details["target"], abs=1e-6)
    assert details["loss"]["after"] == pytest.approx(cross_entropy(model, feeds[:4]), abs=1e-4)
    for node in (n for n in model.graph if ops.is_threshold(n)):
        assert ops.score_scale(node) is not None and node.inputs[1].const_value.numpy().ndim == 1
        assert ops.threshold_level(node) != before[node.name]


@pytest.mark.parametrize("options, message", [({"steps": 0}, "steps must be at least 1"),
                                               ({"threads": 0}, "threads must be at least 1"),
                                               ({"batch": 5, "windows": 4}, "batch .5. must not exceed windows"),
                                               ({"lr": 0.0}, "lr must be greater than 0"),
                                               ({"temperature": -1.0}, "temperature must be greater than 0"),
                                               ({"seed": -1}, "seed must be at least 0")])
def test_bad_options(options, message):
    with pytest.raises(SparseccError, match=message):
        get("finetune-bands")(**options)


def test_needs_calibrated_thresholds():
    feeds = token_feeds()
    with pytest.raises(SparseccError, match="pipeline order: finetune-bands needs thresholds set to a sparsity, which no pass before it provides; put "
                                           "calibrate-thresholds or allocate-sparsity"):
        PassManager([get("insert-thresholds")(), get("finetune-bands")()]).run(
            to_ir(llama_model()), Context(calibration=as_feed_source(feeds)))
    # Levels set, but all at 0 (sparsity 0): found when the pass is reached.
    with pytest.raises(SparseccError, match="every threshold at t = 0: run calibrate-thresholds"):
        PassManager([get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.0), get("finetune-bands")()]).run(
            to_ir(llama_model()), Context(calibration=as_feed_source(feeds)))


def test_without_torch_the_pass_says_how_to_install_it(monkeypatch):
    model = thresholded(to_ir(llama_model()), token_feeds())
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now raises ImportError
    with pytest.raises(SparseccError, match=r"needs PyTorch, which is not installed: pip install -e '.\[export\]'"):
        PassManager([get("finetune-bands")()]).run(model, Context(calibration=as_feed_source(token_feeds())))


def test_the_pass_registry_loads_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from sparsecc.passes import get\n"
            "print(get('finetune-bands').summary())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Learn each threshold's band")
