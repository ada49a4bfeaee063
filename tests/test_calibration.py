"""Calibrated thresholds meet the sparsity target on held-out data from the same distribution."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import mlp_feeds
from sparsecc.backends.ort import OrtBackend

import sparsecc
from sparsecc import model_io
from sparsecc.data import IterableFeeds

CALIB = mlp_feeds(24, seed=10)
HELD_OUT = mlp_feeds(24, seed=11)
THRESHOLDED = {"gate", "up", "down", "fc"}   # node names of the mlp_model sites (for reading rows only)
NATURAL, HEAD = "out", "head"


def compile_and_measure(mlp_path, tmp_path, sparsity, mode, calibration=CALIB):
    out = tmp_path / f"out-{mode}"
    result = sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(sparsity=sparsity, mode=mode),
                                    calibration, out=out)
    model = model_io.load_model(out / "model.onnx")
    measured = OrtBackend().evaluate(model, IterableFeeds(HELD_OUT))
    rows = {r["site"]: r for r in measured["sites"]}
    calib = next(p["details"] for p in result.report["passes"] if p["pass"] == "calibrate-thresholds")
    return rows, measured, calib


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_uniform_each_site_meets_target(mlp_path, tmp_path, sparsity):
    rows, measured, calib = compile_and_measure(mlp_path, tmp_path, sparsity, "uniform")
    assert set(rows) == THRESHOLDED | {NATURAL, HEAD}
    for name in THRESHOLDED:
        assert rows[name]["thresholded"]
        assert abs(rows[name]["sparsity"] - sparsity) <= 0.02, (name, rows[name]["sparsity"])
    # gate and up share one threshold, hence one measured figure.
    assert rows["gate"]["tensor"] == rows["up"]["tensor"]
    assert len(calib["thresholds"]) == 3
    for row in calib["thresholds"]:
        assert abs(row["calibrated_sparsity"] - sparsity) <= 0.005
    # The natural site gets no threshold, the head stays dense.
    assert not rows[NATURAL]["thresholded"] and rows[NATURAL]["natural"] == "relu"
    assert 0.2 < rows[NATURAL]["sparsity"] < 0.8
    assert rows[HEAD]["head"] and not rows[HEAD]["thresholded"] and rows[HEAD]["sparsity"] == 0.0
    assert measured["macs"]["all"]["dense_per_token"] == sum(r["macs_per_token"] for r in rows.values())


@pytest.mark.parametrize("sparsity", [0.6, 0.8])
def test_mac_weighted_model_figure_meets_target(mlp_path, tmp_path, sparsity):
    rows, measured, calib = compile_and_measure(mlp_path, tmp_path, sparsity, "mac-weighted")
    body = measured["macs"]["body"]
    assert body["dense_per_token"] == sum(r["macs_per_token"] for r in rows.values() if not r["head"])
    assert abs(body["sparsity"] - sparsity) <= 0.02, body
    assert abs(calib["calibrated_model_sparsity"] - sparsity) <= 0.005
    # One common level: the thresholded sites sit near it, and the natural ReLU site, which
    # needs no threshold, lets the others stay below what uniform would need at the same target.
    level = calib["level"]
    for name in THRESHOLDED:
        assert abs(rows[name]["sparsity"] - level) <= 0.02, (name, rows[name]["sparsity"], level)
    natural = rows[NATURAL]["sparsity"]
    assert (level - sparsity) * (sparsity - natural) >= 0
    assert level != pytest.approx(sparsity, abs=0.01)


def test_calibration_data_reader_and_generator_give_the_same_thresholds(mlp_path, tmp_path):
    class Reader:  # ONNX Runtime's CalibrationDataReader protocol
        def __init__(self, feeds):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    pipeline = sparsecc.default_pipeline(sparsity=0.5, mode="uniform")
    a = sparsecc.compile_model(mlp_path, pipeline, Reader(CALIB[:6]))
    b = sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(sparsity=0.5, mode="uniform"),
                               (f for f in CALIB[:6]))
    ta = [r["t"] for r in a.report["passes"][2]["details"]["thresholds"]]
    tb = [r["t"] for r in b.report["passes"][2]["details"]["thresholds"]]
    assert ta == tb and all(t > 0 for t in ta)


def test_thresholds_scale_with_the_data(mlp_path):
    """Calibrating on inputs scaled by 10 gives a 10x larger first threshold (up to a bin)."""
    pipeline = lambda: sparsecc.default_pipeline(sparsity=0.5, mode="uniform", refine=0)
    small = sparsecc.compile_model(mlp_path, pipeline(), CALIB[:6])
    big = sparsecc.compile_model(mlp_path, pipeline(), [{"x": f["x"] * 10} for f in CALIB[:6]])
    t_small = small.report["passes"][2]["details"]["thresholds"][0]["t"]
    t_big = big.report["passes"][2]["details"]["thresholds"][0]["t"]
    assert t_big / t_small == pytest.approx(10, rel=0.02)
    assert np.isfinite(t_big)


def _thresholds(result) -> dict[str, float]:
    calib = next(p["details"] for p in result.report["passes"] if p["pass"] == "calibrate-thresholds")
    return {r["threshold"]: r["t"] for r in calib["thresholds"]}


def test_a_pass_over_strided_windows_equals_a_pass_over_those_windows_alone(mlp_path):
    from sparsecc import ops
    from sparsecc.calibration import Collector, statistic

    model = sparsecc.compile_model(mlp_path, sparsecc.default_pipeline()[:2]).model   # thresholds at 0
    tensors = sorted({statistic(n) for n in model.graph if ops.is_threshold(n)})
    with Collector(model, tensors, IterableFeeds(CALIB[:10])) as collector:
        every, fourth = collector.measure(every=(1, 4))
        alone = collector.measure(every=(4,))[0]
    with Collector(model, tensors, IterableFeeds(CALIB[:10:4])) as collector:
        subset = collector.measure()[0]
    with Collector(model, tensors, IterableFeeds(CALIB[:10])) as collector:
        full = collector.measure()[0]
    for name in tensors:
        assert np.array_equal(fourth[name].counts, subset[name].counts)
        assert np.array_equal(alone[name].counts, subset[name].counts)
        assert np.array_equal(every[name].counts, full[name].counts)


def test_shifted_histogram_moves_all_windows_by_what_changed_on_the_subset():
    from sparsecc.calibration import AbsHistogram, shifted

    rng = np.random.default_rng(0)
    x = rng.standard_normal(40_000)
    full, base, now = AbsHistogram(), AbsHistogram(), AbsHistogram()
    full.add(x)
    base.add(x[:10_000])          # the subset, as the dense pass saw it
    now.add(x[:10_000] * 1.1)     # the same windows behind the thresholds
    assert np.array_equal(shifted(full, base, base).counts, full.counts)   # nothing changed: the dense figures
    assert np.array_equal(shifted(now, now, base).counts, base.counts)     # the subset is everything: its own
    moved = shifted(full, base, now)
    assert moved.total == full.total and (moved.counts >= 0).all()
    # |x| scaled by 1.1 on the subset: every quantile of all windows moves by 1.1 (to a bin)
    for level in (0.3, 0.5, 0.8):
        assert moved.threshold_for(level) / full.threshold_for(level) == pytest.approx(1.1, rel=0.01)


def test_refine_on_every_nth_window_runs_those_windows_and_stays_near_the_full_refine(mlp_path, monkeypatch):
    from sparsecc import runtime

    runs = []
    run = runtime.CheckedSession.run
    monkeypatch.setattr(runtime.CheckedSession, "run", lambda self, *a, **k: runs.append(1) or run(self, *a, **k))

    def thresholds(every):
        runs.clear()
        result = sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(refine_every=every), CALIB)
        return _thresholds(result), len(runs)

    full, runs_full = thresholds(1)
    quarter, runs_quarter = thresholds(4)
    assert runs_full == 2 * len(CALIB)
    # the dense pass runs every window, the refine round windows 0, 4, 8, ... only
    assert runs_quarter == len(CALIB) + len(CALIB) // 4
    assert set(full) == set(quarter)
    for name, t in full.items():
        assert quarter[name] == pytest.approx(t, rel=0.03), name


def test_refine_on_a_subset_is_cached_and_reused(mlp_path, mlp_npz, tmp_path):
    from sparsecc.calibration import STATS
    from sparsecc.data import NpzFeeds

    def compile_():
        return sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(refine_every=3), NpzFeeds(mlp_npz),
                                      cache_dir=tmp_path / "cache")

    before = dict(STATS)
    first = compile_()
    assert STATS["computed"] == before["computed"] + 3   # all windows, their every 3rd, the refine round
    assert len(list((tmp_path / "cache").glob("hist-*.npz"))) == 3
    again = compile_()
    assert STATS["computed"] == before["computed"] + 3 and STATS["reused"] == before["reused"] + 3
    assert _thresholds(first) == _thresholds(again)
