"""greedy-blocks (TEAL's block-wise greedy allocation) on the tiny models and the bundled
sample: blocks found from structure, each greedy move the least harmful one (checked against
the whole model in ONNX Runtime), every block on its target, no worse than one uniform level,
resumable mid-block."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import SAMPLE_MODEL, llama_model, mlp_feeds, mlp_model, save, to_ir

from sparsecc import model_io, ops
from sparsecc.blocks import find_blocks
from sparsecc.calibration import collect
from sparsecc.data import as_feed_source
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.runtime import ort_session
from sparsecc.sites import analyze, const_root
from sparsecc.threshold_search import Checkpoint, thresholds_by_role

WINDOWS = 3


def sample_feeds(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, 2048, (1, 32)).astype(np.int64)} for _ in range(n)]


def sample(**insert):
    model = model_io.load_model(SAMPLE_MODEL)
    PassManager([get("insert-thresholds")(**insert)]).run(model, Context())
    return model


def greedy(model, data, cache_dir=None, **options):
    options.setdefault("windows", WINDOWS)
    reports = PassManager([get("greedy-blocks")(**options)]).run(
        model, Context(calibration=as_feed_source(data), cache_dir=cache_dir))
    return reports[-1].details


def test_blocks_of_the_sample_follow_its_structure():
    model = sample()
    blocks, thresholds = find_blocks(model, thresholds_by_role(model)[0])
    assert len(blocks) == 4 and len(thresholds) == 16
    for block in blocks:
        assert len(block.thresholds) == 4 and block.output.producer().op_type == "Add"
        assert all(th.node in block.nodes for th in block.thresholds)
    for before, after in zip(blocks, blocks[1:]):   # each block reads the previous one's output
        assert before.output in after.boundary


def test_each_move_is_the_least_harmful_one_measured_on_the_whole_model():
    """With a target of one step, every block makes exactly one move; it must be the group
    whose move adds the least block-output error, measured here in a whole-model session."""
    data = sample_feeds()
    details = greedy(sample(), data, sparsity=0.025, step=0.025, refine=0)
    model = sample()
    blocks, thresholds = find_blocks(model, thresholds_by_role(model)[0])
    hists = collect(model, [th.source for th in thresholds], as_feed_source(data))
    outputs = [b.output.name for b in blocks]
    assert outputs == [row["output"] for row in details["blocks"]]

    for th in thresholds:   # every t a graph input of one whole-model session
        del model.graph.initializers[th.node.inputs[1].name]
        model.graph.inputs.append(th.node.inputs[1])
    with ort_session(model, outputs) as session:
        def block_outputs(moved=None, t=0.0):
            ts = {th.node.inputs[1].name: np.array(t if th is moved else 0.0, np.float32) for th in thresholds}
            return [session.run(outputs, feed | ts) for feed in data[:WINDOWS]]

        dense = block_outputs()
        errors = {}
        for block in blocks:
            for th in block.thresholds:
                moved = block_outputs(th, hists[th.source].threshold_for(0.025 * block.macs / th.macs))
                errors[th.node.name] = np.mean([np.mean((m[block.index].astype(np.float64) - d[block.index]) ** 2)
                                                for m, d in zip(moved, dense)])
    for block, row in zip(blocks, details["blocks"]):
        errors_here = {th.node.name: errors[th.node.name] for th in block.thresholds}
        chosen = [th.node.name for th in block.thresholds if details_level(details, th) > 0]
        assert len(chosen) == 1 and row["moves"] == 1
        assert errors[chosen[0]] <= min(errors_here.values()) * (1 + 1e-6)
        assert row["error"] == pytest.approx(errors[chosen[0]], rel=1e-4)   # the cut session = the whole model
        assert row["sparsity"] == pytest.approx(0.025, abs=1e-6)


def details_level(details, th) -> float:
    return next(r for r in details["thresholds"] if r["threshold"] == th.node.name)["level"]


def test_the_harmless_site_gets_the_most_sparsity():
    model = to_ir(llama_model())
    o_proj = next(n for n in analyze(model.graph).nodes if n.name == "o_proj")
    weight = const_root(o_proj.inputs[1])
    weight.const_value = ir.tensor(weight.const_value.numpy() * 1e-4, name=weight.name)   # o barely matters
    PassManager([get("insert-thresholds")()]).run(model, Context())
    rng = np.random.default_rng(0)
    data = [{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(6)]
    details = greedy(model, data, sparsity=0.5)
    levels = details["blocks"][0]["levels"]
    assert levels["16x16"] == max(levels.values()) == 0.95   # the o_proj input (q/k/v is 16x16+16x16+16x16)


def test_every_block_meets_its_target_and_beats_uniform_levels():
    data = sample_feeds()
    details = greedy(sample(), data, sparsity=0.4, refine=0)
    model = sample()   # measure the compiled thresholds on the dense activations, independently
    sites = analyze(model.graph).sites
    sources = {n.name: n.inputs[0].name for n in model.graph if ops.is_threshold(n)}
    with ort_session(model, sorted(sources.values())) as session:
        names = sorted(sources.values())
        acts = [dict(zip(names, session.run(names, feed))) for feed in data]
    zeroed, total = np.zeros(4), np.zeros(4)
    for row in details["thresholds"]:
        x = np.abs(np.concatenate([a[sources[row["threshold"]]].ravel() for a in acts]))
        macs = sum(s.macs_per_token for s in sites if s.threshold == row["threshold"])
        block = int(row["group"].split(":")[0].split()[1])
        zeroed[block] += macs * np.mean(x <= row["t"])
        total[block] += macs
    np.testing.assert_allclose(zeroed / total, 0.4, atol=0.005)   # histogram bins: ~1% wide, interpolated
    assert details["calibrated_model_sparsity"] == pytest.approx(0.4, abs=1e-6)
    for row in details["blocks"]:
        assert row["sparsity"] == pytest.approx(0.4, abs=1e-6) and row["uniform_level"] == pytest.approx(0.4)
        assert row["error"] <= row["uniform_error"]
    assert details["error_vs_uniform"]["mean_ratio"] < 1


def test_naturally_sparse_sites_count_toward_their_block():
    """mlp_model in one block: its ReLU output (about half zeros) feeds w_out, whose zeros carry
    part of the target, so the thresholded inputs need less than the target on average."""
    model = to_ir(mlp_model())
    PassManager([get("insert-thresholds")()]).run(model, Context())
    data = mlp_feeds(6, rows=32)
    details = greedy(model, data, sparsity=0.3, refine=0)
    sites = analyze(model.graph).sites
    (natural,) = [s for s in sites if s.natural]
    for node in model.graph:   # its zeros as the search saw them: dense, every t at 0
        if ops.is_threshold(node):
            ops.set_threshold(node, 0.0)
    with ort_session(model, [natural.consumes]) as session:
        zeros = np.mean([np.mean(session.run([natural.consumes], feed)[0] == 0) for feed in data])
    (block,) = details["blocks"]
    assert block["macs_per_token"] == sum(s.macs_per_token for s in sites if not s.head)   # w_out included
    assert block["sparsity"] == pytest.approx(0.3, abs=1e-6)
    macs = {r["threshold"]: sum(s.macs_per_token for s in sites if s.threshold == r["threshold"])
            for r in details["thresholds"]}
    thresholded = sum(macs.values())
    mean_level = sum(macs[r["threshold"]] * r["level"] for r in details["thresholds"]) / thresholded
    expected = (0.3 * block["macs_per_token"] - zeros * natural.macs_per_token) / thresholded
    assert zeros > 0.3 and mean_level == pytest.approx(expected, abs=1e-6) and mean_level < 0.28


def test_one_threshold_per_projection_and_irregular_roles():
    data = sample_feeds(2)
    per_site = greedy(sample(per_consumer=True), data, sparsity=0.1, windows=1, refine=0)
    assert len(per_site["blocks"]) == 4
    assert all(len(b["levels"]) == 7 for b in per_site["blocks"])   # q, k, v, o, gate, up, down
    assert all(b["sparsity"] == pytest.approx(0.1, abs=1e-6) for b in per_site["blocks"])
    with_head = greedy(sample(include_head=True), data, sparsity=0.1, windows=1, refine=0)   # roles x4, x1: one block
    (block,) = with_head["blocks"]
    assert block["output"] == "logits" and len(block["levels"]) == 17


@pytest.mark.parametrize("before", [{"weight-scores": {}}, {"compensate-lowrank": {"rank": 8}}])
def test_after_weight_scores_or_compensation(before):
    """Per-channel t (weight-scores) and low-rank compensation, whose Add joins each site's
    output before the residual: the block outputs stay the residual sums, every block meets its
    target with the compensation's MACs paid."""
    data = sample_feeds(2)
    model = sample()
    plain = find_blocks(model, thresholds_by_role(model)[0])[0]
    PassManager([get(name)(**options) for name, options in before.items()]).run(model, Context())
    details = greedy(model, data, sparsity=0.2, windows=1, refine=0)
    assert [b["output"] for b in details["blocks"]] == [b.output.name for b in plain]
    assert all(b["sparsity"] == pytest.approx(0.2, abs=1e-6) for b in details["blocks"])
    assert details["calibrated_model_sparsity"] == pytest.approx(0.2, abs=1e-6)


def test_resumes_mid_block_to_the_same_result_with_fewer_passes(tmp_path, monkeypatch):
    data = sample_feeds()
    straight = greedy(sample(), data, sparsity=0.2)
    save = Checkpoint.save
    calls = []

    def interrupted(self, levels, history):
        save(self, levels, history)
        calls.append(1)
        if len(calls) == 13:   # part-way through block 1 (8 moves and a summary a block)
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        greedy(sample(), data, cache_dir=tmp_path, sparsity=0.2)
    monkeypatch.setattr(Checkpoint, "save", save)
    resumed = greedy(sample(), data, cache_dir=tmp_path, sparsity=0.2)
    again = greedy(sample(), data, cache_dir=tmp_path, sparsity=0.2)
    assert resumed["search"]["resumed"] and again["search"]["resumed"]
    for details in (resumed, again):
        assert details["thresholds"] == straight["thresholds"] and details["blocks"] == straight["blocks"]
    assert again["search"]["forward_passes"] == 0
    assert 0 < resumed["search"]["block_passes"] < straight["search"]["block_passes"]


@pytest.mark.parametrize("options, message", [({"sparsity": 0.95}, "sparsity must be in"),
                                               ({"sparsity": -0.1}, "sparsity must be in"),
                                               ({"step": 0.0}, "step must be in"),
                                               ({"step": 0.6}, "step must be in"),
                                               ({"windows": 0}, "windows must be at least 1"),
                                               ({"refine": -1}, r"refine must be in \[0, 100\]")])
def test_bad_options(options, message):
    with pytest.raises(SparseccError, match=message):
        get("greedy-blocks")(**options)


def test_needs_thresholds_and_data():
    with pytest.raises(SparseccError, match="pipeline order: greedy-blocks needs Threshold ops, which no pass before it provides; put insert-thresholds before it"):
        greedy(model_io.load_model(SAMPLE_MODEL), sample_feeds(2))
    with pytest.raises(SparseccError, match="needs calibration data"):
        PassManager([get("greedy-blocks")()]).run(sample(), Context())


def test_weights_in_external_data_give_the_same_result(tmp_path):
    """A model loaded with its weights in a .data file (as SmolLM2 is): each block's session
    gets its weights inlined, and the result is that of the same model held in memory."""
    proto = llama_model()
    path = save(proto, tmp_path / "inline" / "model.onnx")
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(path), str(external), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    rng = np.random.default_rng(0)
    data = [{"input_ids": rng.integers(0, 24, (1, 12)).astype(np.int64)} for _ in range(4)]
    results = []
    for file in (path, external):
        model = model_io.load_model(file)
        PassManager([get("insert-thresholds")()]).run(model, Context())
        results.append(greedy(model, data, sparsity=0.3, refine=0))
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    assert results[0]["thresholds"] == results[1]["thresholds"] and results[0]["blocks"] == results[1]["blocks"]
