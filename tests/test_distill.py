"""distill (training the weights with the thresholds in place, against the model with its
thresholds open), the self-sampled data it can learn from, and the batched/device paths of
the PyTorch evaluator under both: the student gets closer to the teacher at the same measured
sparsity, the target holds, the written model is what was trained, runs are deterministic and
resumable, and bad input fails in one line."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
import torch
from conftest import SAMPLE, SAMPLE_MODEL, VALID_TXT, llama_model, mlp_feeds, mlp_model, to_ir

import sparsecc
from sparsecc import cli, model_io, ops
from sparsecc.calibration import collect
from sparsecc.data import MixedFeeds, as_feed_source
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import distill as distill_module, get
from sparsecc.passes.distill import trainable_tensors
from sparsecc.runtime import ort_session
from sparsecc.sampling import SampledWindows, sample_windows
from sparsecc.threshold_search import threshold_sparsity, thresholds_by_role
from sparsecc.torch_eval import TorchGraph

import torch._dynamo  # noqa: E402,F401  (its temp folder is made at first import: before the leftovers check)


def token_feeds(n=16, seq=12, vocab=24, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]


def thresholded(model: ir.Model, feeds, sparsity=0.5) -> ir.Model:
    PassManager([get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=sparsity)]).run(
        model, Context(calibration=as_feed_source(feeds)))
    return model


def distilled(model, feeds, cache_dir=None, **options):
    report, = PassManager([get("distill")(**options)]).run(
        model, Context(calibration=as_feed_source(feeds), cache_dir=cache_dir, device="cpu"))
    return report.details


def kl_to(model: ir.Model, teacher: ir.Model, feeds) -> float:
    """Mean per-token KL(teacher || model) of the next-token distributions, in ONNX Runtime."""
    total = 0.0
    with ort_session(model) as s, ort_session(teacher) as t:
        for feed in feeds:
            p, q = (np.asarray(sess.run(None, feed)[0], np.float64) for sess in (t, s))
            logp = p - p.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            logq = q - q.max(-1, keepdims=True)
            logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
            total += float((np.exp(logp) * (logp - logq)).sum(-1).mean())
    return total / len(feeds)


def measured_sparsity(model: ir.Model, feeds) -> float:
    """Model-wide MAC-weighted sparsity measured on `feeds` with the thresholds in place."""
    thresholds, natural = thresholds_by_role(model)
    each = [th.__class__(**{**th.__dict__, "group": th.node.name}) for th in thresholds]
    hists = collect(model, [th.source for th in each] + [s.consumes for s in natural], as_feed_source(feeds))
    return threshold_sparsity(each, natural, hists, {th.node.name: ops.threshold_level(th.node) for th in each})


def model_bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


# The evaluator's batched and device paths ----------------------------------------------------------

def test_batched_run_equals_one_window_at_a_time():
    """The sample's graph has batch 1 fixed in its shapes; run_batch (vmap) gives each window's
    outputs exactly, and a second call (static values reused) gives the same again."""
    graph = TorchGraph(model_io.load_model(SAMPLE_MODEL))
    feeds = token_feeds(3, seq=20, vocab=2048)
    with torch.no_grad():
        batched = graph.run_batch(feeds)[0]
        again = graph.run_batch(feeds)[0]
        one = torch.stack([graph.run(f)[0] for f in feeds])
    assert torch.equal(batched, one) and torch.equal(again, one)


def test_trainable_tensors_are_the_weights():
    """On the sample: all = the sites' weights (head too), the embedding and the norm scales;
    the rotary frequencies and scalars are constants of the computation, never trained."""
    model = model_io.load_model(SAMPLE_MODEL)
    everything = trainable_tensors(model, "all")
    linear, norms = trainable_tensors(model, "linear"), trainable_tensors(model, "norms")
    assert set(linear) | set(norms) <= set(everything) and not set(linear) & set(norms)
    assert "lm.model.rotary_emb.inv_freq" not in everything
    assert all(model.graph.initializers[n].const_value.size > 1 for n in everything)
    assert len(linear) == 29 and len(norms) == 9   # 4 layers x (q, k, v, o, gate, up, down) + head; 2 norms + final


# Distillation ----------------------------------------------------------------------------------

def test_student_moves_toward_the_teacher_at_the_same_measured_sparsity():
    feeds = token_feeds(24)
    dense = to_ir(llama_model())
    model = thresholded(to_ir(llama_model()), feeds)
    held = token_feeds(8, seed=1)
    before = (kl_to(model, dense, held), measured_sparsity(model, feeds))
    details = distilled(model, feeds, steps=30, batch=4, lr=3e-3, held_out=4)
    after = (kl_to(model, dense, held), measured_sparsity(model, feeds))
    assert details["calibrated_model_sparsity"] == pytest.approx(details["target"], abs=1e-3)
    assert after[1] == pytest.approx(before[1], abs=0.02)                  # measured again, independently
    assert after[0] < 0.95 * before[0]                                      # on windows it never saw
    assert details["held_out"]["after"]["kl"] < details["held_out"]["before"]["kl"]
    assert details["held_out"]["before"]["ppl_student_open"] == details["held_out"]["before"]["ppl_teacher"]
    t = details["training"]
    assert t["tokens"] == 30 * 4 * 12 and t["device"] == "cpu" and t["windows"] == 20 and t["held_out_windows"] == 4
    assert len(details["history"]) == 30 and details["history"][-1]["step"] == 30


def test_the_written_model_is_what_was_trained():
    """ORT on the written model equals the torch evaluator on it, and the weights changed."""
    feeds = token_feeds()
    model = thresholded(to_ir(llama_model()), feeds)
    entry = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    distilled(model, feeds, steps=4, batch=2, lr=1e-2)
    changed = [n for n in trainable_tensors(model, "all") if not np.array_equal(entry[n], model.graph.initializers[n].const_value.numpy())]
    assert len(changed) == len(trainable_tensors(model, "all"))
    graph = TorchGraph(model)
    with ort_session(model) as session:
        for feed in feeds[:4]:
            ref = session.run(None, feed)[0]
            with torch.no_grad():
                ours = graph.run(feed)[0].numpy()
            assert np.abs(ref - ours).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_only_the_chosen_tensors_train():
    feeds = token_feeds()
    model = thresholded(to_ir(llama_model()), feeds)
    entry = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    distilled(model, feeds, steps=2, batch=2, lr=1e-2, train="norms")
    moved = {n for n in entry if not np.array_equal(entry[n], model.graph.initializers[n].const_value.numpy())}
    t_inputs = {node.inputs[1].name for node in model.graph if ops.is_threshold(node)}
    assert moved - t_inputs == set(trainable_tensors(model, "norms"))


def test_deterministic_and_resumable(tmp_path, monkeypatch):
    options = dict(steps=6, batch=2, seed=3, recalibrate_every=2, checkpoint_every=2, samples=4)
    feeds = token_feeds()
    plain = thresholded(to_ir(llama_model()), feeds)
    details = distilled(plain, feeds, **options)
    again = thresholded(to_ir(llama_model()), feeds)
    distilled(again, feeds, **options)
    assert model_bytes(plain) == model_bytes(again)                        # byte-identical on the CPU
    saves = []
    real = distill_module._atomic_torch_save

    def interrupted(path, state):
        real(path, state)
        saves.append(state["step"])
        if state["step"] == 4:
            raise KeyboardInterrupt
    monkeypatch.setattr(distill_module, "_atomic_torch_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distilled(thresholded(to_ir(llama_model()), feeds), feeds, tmp_path, **options)
    monkeypatch.setattr(distill_module, "_atomic_torch_save", real)
    resumed_model = thresholded(to_ir(llama_model()), feeds)
    resumed = distilled(resumed_model, feeds, tmp_path, **options)
    assert saves == [2, 4] and resumed["training"]["resumed_at"] == 4
    assert model_bytes(resumed_model) == model_bytes(plain)                 # as if never interrupted
    assert resumed["history"] == details["history"]
    other = thresholded(to_ir(llama_model()), feeds)
    distilled(other, feeds, **(options | {"seed": 4}))
    assert model_bytes(other) != model_bytes(plain)


def test_a_float_input_model_learns_the_dense_outputs():
    """A model whose input is not token ids trains on the squared error against the teacher's
    outputs (held-out generalisation is the LM test's subject: this tiny MLP overfits)."""
    feeds = mlp_feeds(40, rows=16)
    model = thresholded(to_ir(mlp_model()), feeds)
    details = distilled(model, feeds, steps=40, batch=4, lr=1e-2)
    losses = [h["loss"] for h in details["history"]]
    assert "kl" not in details["history"][0] and np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert set(details["held_out"]["after"]) == {"windows", "squared_error"}
    assert details["calibrated_model_sparsity"] == pytest.approx(details["target"], abs=1e-3)


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be at least 1"), ({"batch": 0}, "batch must be at least 1"),
    ({"samples": -1}, "samples must be at least 0"), ({"lr": 0.0}, "lr must be greater than 0"),
    ({"warmup": 1.0}, r"warmup must be in \[0, 1\)"), ({"train": "heads"}, "train must be one of all, linear, norms"),
    ({"gradient": "soft"}, "gradient must be one of masked, straight")])
def test_bad_options(options, message):
    with pytest.raises(SparseccError, match=message):
        get("distill")(**options)


def test_preconditions_name_the_fix():
    feeds = token_feeds()
    with pytest.raises(SparseccError, match="pipeline order: distill needs thresholds set to a sparsity, which no pass before it provides; put "
                                           "calibrate-thresholds or allocate-sparsity"):
        PassManager([get("insert-thresholds")(), get("distill")()]).run(
            to_ir(llama_model()), Context(calibration=as_feed_source(feeds)))
    # Levels set, but all at 0 (sparsity 0): found when the pass is reached.
    with pytest.raises(SparseccError, match="every threshold at t = 0: run calibrate-thresholds"):
        PassManager([get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=0.0), get("distill")()]).run(
            to_ir(llama_model()), Context(calibration=as_feed_source(feeds)))
    with pytest.raises(SparseccError, match="held_out"):
        distilled(thresholded(to_ir(llama_model()), feeds), feeds[:4], held_out=4)
    with pytest.raises(SparseccError, match="samples need a language model"):
        distilled(thresholded(to_ir(mlp_model()), mlp_feeds(8, rows=16)), mlp_feeds(8, rows=16), samples=2)


def test_without_torch_the_pass_says_how_to_install_it(monkeypatch):
    model = thresholded(to_ir(llama_model()), token_feeds())
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now raises ImportError
    with pytest.raises(SparseccError, match=r"distill needs PyTorch, which is not installed: pip install"):
        PassManager([get("distill")()]).run(model, Context(calibration=as_feed_source(token_feeds())))


def test_cuda_where_there_is_none_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")   # CI has none: the case below is what users without one meet
    code = cli.main(["compile", str(SAMPLE_MODEL), "--sparsity", "0.5", "--calib", str(VALID_TXT), "--tokenizer",
                     str(SAMPLE), "--windows", "2", "--seq-len", "32", "--distill-steps", "1", "--device", "cuda",
                     "--no-cache", "-o", "unused-out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sparsecc: error: device cuda asked for, but PyTorch")
    assert "use --device cpu" in err[-1]


# Self-sampled data -----------------------------------------------------------------------------

def test_samples_are_seeded_and_reproducible():
    graph = TorchGraph(to_ir(llama_model()))
    first = np.array([1, 1, 2])
    a = sample_windows(graph, first, 10, seed=0)
    assert a.shape == (3, 10) and (a[:, 0] == first).all() and a.min() >= 0 and a.max() < 24
    assert np.array_equal(a, sample_windows(graph, first, 10, seed=0, batch=2))   # batching changes nothing
    assert not np.array_equal(a, sample_windows(graph, first, 10, seed=1))
    greedy = sample_windows(graph, first[:1], 6, seed=0, temperature=0)
    with torch.no_grad():                                                          # temperature 0 is the argmax
        for n in range(1, 6):
            logits = graph.run({"input_ids": greedy[:, :n]})[0]
            assert greedy[0, n] == int(logits[0, -1].argmax())


def test_sampled_calibration_source(tmp_path):
    """--calib-samples: windows from the model itself, cached by the exact model file, mixed
    with text; they start with the tokenizer's BOS."""
    source = sparsecc.data_source(VALID_TXT, SAMPLE, 16, 3, samples=2, model=SAMPLE_MODEL, device="cpu",
                                  cache_dir=tmp_path)
    assert isinstance(source, MixedFeeds) and len(source) == 5
    rows = [f["input_ids"] for f in source.feeds(["input_ids"])]
    assert all(r.shape == (1, 16) for r in rows) and rows[3][0, 0] == rows[0][0, 0]   # BOS
    assert len(list(tmp_path.glob("samples-*.npy"))) == 1
    again = sparsecc.data_source(VALID_TXT, SAMPLE, 16, 3, samples=2, model=SAMPLE_MODEL, device="cpu",
                                 cache_dir=tmp_path)
    assert again.key() == source.key() and [f["input_ids"].tolist() for f in again.feeds(["input_ids"])] == \
        [r.tolist() for r in rows]
    described = source.describe()
    assert described["kind"] == "mixed" and described["parts"][1]["kind"] == "sampled"
    with pytest.raises(SparseccError, match="at least 1"):
        SampledWindows(SAMPLE_MODEL, 0, 16, 1)


# From the command line, and the result is a normal sparsecc model ---------------------------------

def test_cli_distill_then_eval_inspect_and_simulate(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["compile", str(SAMPLE_MODEL), "--sparsity", "0.5", "--calib", str(VALID_TXT), "--tokenizer",
                     str(SAMPLE), "--windows", "6", "--seq-len", "24", "--distill-steps", "3",
                     "--distill-option", "batch=2", "--distill-option", "text_windows=12", "--calib-samples", "2",
                     "--device", "cpu", "--target", "seneca", "--cache-dir", str(tmp_path / "cache"), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    details = report["passes"][[p["pass"] for p in report["passes"]].index("distill")]["details"]
    assert details["training"]["steps"] == 3 and report["data"]["kind"] == "mixed"
    assert "## distill" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert 'data-figure="training"' in page and 'data-omitted="training"' not in page
    capsys.readouterr()
    assert cli.main(["eval", str(out / "model.onnx"), "--ppl", str(VALID_TXT), "--windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["perplexity"] > 1
    assert cli.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"]
    assert cli.main(["simulate", str(out), "--text", str(VALID_TXT), "--tokens", "4", "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["ratio"]["energy"] > 1 and sim["vs_ort"]["argmax_agreement"] > 0


def test_distill_options_need_distill_steps(capsys):
    code = cli.main(["compile", str(SAMPLE_MODEL), "--calib", str(VALID_TXT), "--tokenizer", str(SAMPLE),
                     "--distill-option", "lr=1e-3", "-o", "unused-out"])
    assert code == 2 and "add --distill-steps N" in capsys.readouterr().err


def test_the_pass_registry_loads_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from sparsecc.passes import get\n"
            "print(get('distill').summary())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Train the weights with the thresholds in place")
