"""smooth-activations (SmoothQuant, issue 17 part 2): on the Llama sample, the float model is
unchanged by it (ORT logits) and so are the thresholds' decisions (the events that are zero);
int8 events lose less after it; what it folds into and what it leaves; its place in the
pipeline; the compile flag and its one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SAMPLE, SAMPLE_MODEL, TEST_TXT, VALID_TXT

import sparsecc
from sparsecc import cli, ops
from sparsecc.errors import PreconditionError
from sparsecc.model_io import load_model
from sparsecc.pass_manager import Context, PassManager
from sparsecc.passes import get
from sparsecc.runtime import ort_session


def data(path, windows=4):
    return sparsecc.data_source(str(path), tokenizer=str(SAMPLE), windows=windows, seq_len=64)


def run(passes):
    """The sample through `passes`: the model and the pass reports."""
    model = load_model(SAMPLE_MODEL)
    return model, PassManager(passes).run(model, Context(calibration=data(VALID_TXT)))


def outputs(model, feeds):
    """The logits and every Threshold's output (is it zero?) over `feeds`."""
    names = [n.outputs[0].name for n in model.graph if ops.is_threshold(n)]
    with ort_session(model, names) as session:
        wanted = [session.get_outputs()[0].name, *names]
        runs = [session.run(wanted, feed) for feed in feeds]
    return np.concatenate([r[0] for r in runs], axis=1), [np.concatenate([r[i].ravel() for r in runs]) == 0
                                                          for i in range(1, len(wanted))]


def base(sparsity=0.5):
    return [get("discover-sites")(), get("insert-thresholds")(), get("calibrate-thresholds")(sparsity=sparsity)]


def feeds():
    return list(data(TEST_TXT, 2).feeds(["input_ids"]))


def test_the_float_model_and_the_thresholds_decisions_are_unchanged():
    plain, _ = run(base())
    smoothed, _ = run(base() + [get("smooth-activations")()])
    (a, zeros_a), (b, zeros_b) = outputs(plain, feeds()), outputs(smoothed, feeds())
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
    flipped = sum(int(np.count_nonzero(za != zb)) for za, zb in zip(zeros_a, zeros_b))
    total = sum(z.size for z in zeros_a)
    assert flipped <= 1e-4 * total, (flipped, total)      # float rounding at the boundary only
    assert np.mean(np.concatenate(zeros_b)) == pytest.approx(np.mean(np.concatenate(zeros_a)), abs=1e-4)


def test_what_it_folds_into_and_what_it_leaves():
    model, results = run(base() + [get("smooth-activations")()])
    rows = {r["tensor"]: r for r in results[-1].details["activations"]}
    folded = sorted({r.get("folded_into") for r in rows.values() if r["smoothed"]})
    assert folded == ["norm-scale", "up-projection"]        # q/k/v and gate/up behind norms; down behind up
    left = [r for r in rows.values() if not r["smoothed"]]
    assert left and all(r["reason"].startswith("made by ") for r in left)   # the attention outputs (o)
    for r in rows.values():
        if r["smoothed"]:
            assert r["event_peak_after"] < r["event_peak_before"] and r["scale_min"] > 0
    # the thresholds it rescaled decide on |x / s| * s: a score scale on each of them
    assert all(ops.score_scale(n) is not None for n in model.graph if ops.is_threshold(n)
               and n.inputs[0].name in {t for t, r in rows.items() if r["smoothed"]})


def test_int8_events_lose_less_after_it():
    every = get("quantize-activations")(max_error=1.0)
    _, plain = run(base() + [get("quantize-weights")(), every])
    _, smoothed = run(base() + [get("smooth-activations")(), get("quantize-weights")(),
                                get("quantize-activations")(max_error=1.0)])
    errors = lambda results: {r["tensor"]: r["relative_error"] for r in results[-1].details["activations"]}
    before, after = errors(plain), errors(smoothed)
    assert sum(after.values()) < 0.8 * sum(before.values()), (before, after)


def test_it_runs_before_the_weights_and_events_are_quantized():
    passes = base() + [get("quantize-weights")(), get("smooth-activations")()]
    with pytest.raises(PreconditionError, match="pipeline order: smooth-activations must run before integer weights"):
        run(passes)


def test_the_compile_flag(tmp_path, capsys):
    flags = ["--calib", str(VALID_TXT), "--tokenizer", str(SAMPLE), "--windows", "4", "--seq-len", "64", "--no-cache"]
    assert cli.main(["-q", "compile", str(SAMPLE_MODEL), "--sparsity", "0.5", "--quant", "w8a8", "--smooth", "0.5",
                     *flags, "-o", str(tmp_path / "out")]) == 0
    names = [line.split("|")[1].strip() for line in (tmp_path / "out" / "report.md").read_text().splitlines()
             if line.startswith("| ") and "|" in line[2:]]
    assert names.index("insert-thresholds") < names.index("smooth-activations") < names.index("quantize-weights")
    capsys.readouterr()
    assert cli.main(["compile", str(SAMPLE_MODEL), "--smooth", "1.5", *flags, "-o", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err == "sparsecc: error: smooth-activations: alpha must be in [0, 1] (got 1.5); e.g. 0.5, the default\n"
    assert cli.main(["compile", str(SAMPLE_MODEL), "--smooth", "0.5", "-o", str(tmp_path / "bad")]) == 2
    assert "smoothing measures the events on calibration data: pass --calib" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
