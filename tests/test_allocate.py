"""allocate-sparsity on the tiny Llama: meets the model-wide target, puts sparsity where it
costs least, beats one level for all on the loss it measures, resumes from its checkpoint."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import SAMPLE_MODEL, llama_model, to_ir

from sparsecc import model_io
from sparsecc.data import as_feed_source
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.runtime import ort_session
from sparsecc.sites import analyze, const_root


def feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(n)]


def cross_entropy(model, data) -> float:
    with ort_session(model) as session:
        total = 0.0
        for feed in data:
            logits = session.run(None, feed)[0][:, :-1].astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            total += -np.take_along_axis(logp, feed["input_ids"][:, 1:, None], axis=-1).mean()
    return total / len(data)


def allocated(model, cache_dir=None, **options):
    reports = PassManager([get("insert-thresholds")(), get("allocate-sparsity")(**options)]).run(
        model, Context(calibration=as_feed_source(feeds()), cache_dir=cache_dir))
    return reports[-1].details


def test_meets_the_target_and_sparsifies_the_harmless_site_most():
    model = to_ir(llama_model())
    o_proj = next(n for n in analyze(model.graph).nodes if n.name == "o_proj")
    weight = const_root(o_proj.inputs[1])
    weight.const_value = ir.tensor(weight.const_value.numpy() * 1e-4, name=weight.name)  # o barely matters
    details = allocated(model, sparsity=0.5, step=0.1, windows=6)
    assert details["calibrated_model_sparsity"] == pytest.approx(0.5, abs=1e-6)
    levels = {g["group"]: g["sparsity"] for g in details["groups"]}
    assert levels["16x16 band 0"] == max(levels.values()) >= 0.9   # the o_proj input: dropped first
    assert details["search"]["forward_passes"] > 0 and details["loss"]["kind"] == "cross-entropy"


def test_beats_one_level_for_all_on_its_loss():
    allocated_model = to_ir(llama_model())
    allocated(allocated_model, sparsity=0.5, step=0.05, windows=6, refine=0)
    uniform = to_ir(llama_model())
    PassManager([get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.5, refine=0)]).run(
        uniform, Context(calibration=as_feed_source(feeds())))
    assert cross_entropy(allocated_model, feeds()) < cross_entropy(uniform, feeds())


def test_resumes_from_its_checkpoint(tmp_path):
    first = allocated(to_ir(llama_model()), cache_dir=tmp_path, sparsity=0.4, step=0.1)
    again = allocated(to_ir(llama_model()), cache_dir=tmp_path, sparsity=0.4, step=0.1)
    assert not first["search"]["resumed"] and again["search"]["resumed"]
    assert again["groups"] == first["groups"] and again["thresholds"] == first["thresholds"]
    assert again["search"]["forward_passes"] < first["search"]["forward_passes"]
    assert list(tmp_path.glob("allocate-*.json"))


@pytest.mark.parametrize("options, message", [({"sparsity": 0.99}, "sparsity must be in"),
                                               ({"step": 0.0}, "step must be in"),
                                               ({"start": 0.6, "sparsity": 0.5}, "start must be in")])
def test_bad_options(options, message):
    with pytest.raises(SparseccError, match=message):
        get("allocate-sparsity")(**options)


# sequential-search ------------------------------------------------------------------------------

def searched(model, cache_dir=None, **options):
    reports = PassManager([get("insert-thresholds")(), get("sequential-search")(**options)]).run(
        model, Context(calibration=as_feed_source(feeds()), cache_dir=cache_dir))
    return reports[-1].details


@pytest.mark.parametrize("loss_inc", [1.0, 1.01, 1.05])
def test_sequential_search_never_accepts_a_threshold_over_budget(loss_inc):
    details = searched(to_ir(llama_model()), loss_inc=loss_inc, step=0.2)
    base = details["loss"]["dense"]
    for step in details["history"]:
        assert step["budget"] == pytest.approx(loss_inc * base) and step["loss"] <= step["budget"]
        base = step["loss"]                       # the allowance compounds from the accepted loss
    assert details["loss"]["searched"] <= loss_inc ** len(details["history"]) * details["loss"]["dense"]


def test_a_looser_budget_buys_more_sparsity():
    tight = searched(to_ir(llama_model()), loss_inc=1.001, step=0.2)
    loose = searched(to_ir(llama_model()), loss_inc=1.05, step=0.2)
    assert loose["calibrated_model_sparsity"] > tight["calibrated_model_sparsity"]


def test_sequential_search_resumes_and_warm_starts(tmp_path):
    """On the bundled sample (several blocks, so each role recurs) the warm start needs fewer
    trials than searching every threshold from the bottom."""
    def sample():
        return model_io.load_model(SAMPLE_MODEL)

    cold = searched(sample(), loss_inc=1.01, step=0.1, warm_start=False)
    first = searched(sample(), cache_dir=tmp_path, loss_inc=1.01, step=0.1)
    again = searched(sample(), cache_dir=tmp_path, loss_inc=1.01, step=0.1)
    assert again["search"]["resumed"] and again["history"] == first["history"]
    assert again["search"]["forward_passes"] < first["search"]["forward_passes"]
    assert sum(s["trials"] for s in first["history"]) < sum(s["trials"] for s in cold["history"])


def test_sample_search_pipeline_compiles_the_sample(tmp_path):
    """samples/search.yaml, as README points to it, on the bundled sample (feeds from the tests)."""
    from pathlib import Path

    import sparsecc
    from sparsecc import pipeline

    passes, data = pipeline.load(Path(__file__).resolve().parents[1] / "samples" / "search.yaml")
    assert [p.name for p in passes] == ["discover-sites", "insert-thresholds", "allocate-sparsity"] and data["calib"]
    result = sparsecc.compile_model(SAMPLE_MODEL, passes, feeds(), out=tmp_path / "out")
    details = result.report["passes"][-1]["details"]
    assert details["calibrated_model_sparsity"] == pytest.approx(0.4, abs=1e-6)
