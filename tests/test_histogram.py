"""AbsHistogram: quantiles of |x| from fixed log-spaced bins."""
from __future__ import annotations

import numpy as np
import pytest

from sparsecc.calibration import BINS, AbsHistogram

N = 200_000
TARGETS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def sample(kind: str, n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0.0, 0.02, n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(0.3, 5.0, n).astype(np.float32)
    if kind == "heavy":  # Student t with 1.5 degrees of freedom: infinite variance
        return (rng.standard_t(1.5, n) * 100).astype(np.float32)
    if kind == "lognormal-wide":  # |x| spanning many octaves
        return (rng.lognormal(0.0, 6.0, n) * rng.choice([-1, 1], n)).astype(np.float32)
    raise ValueError(kind)


def achieved(x: np.ndarray, t: float) -> float:
    return float(np.mean(np.abs(x.astype(np.float64)) <= t))


@pytest.mark.parametrize("kind", ["normal", "laplace", "heavy", "lognormal-wide"])
def test_threshold_for_meets_target(kind):
    x = sample(kind)
    h = AbsHistogram()
    for chunk in np.array_split(x, 7):  # streamed in uneven pieces
        h.add(chunk.reshape(-1, 1))
    assert h.total == N
    for s in TARGETS:
        t = h.threshold_for(s)
        assert t > 0
        assert abs(achieved(x, t) - s) <= 0.005, (kind, s, t, achieved(x, t))
    # Monotone in the target.
    ts = [h.threshold_for(s) for s in TARGETS]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_sparsity_at_inverts_threshold_for(kind):
    h = AbsHistogram()
    h.add(sample(kind, seed=3))
    for s in np.linspace(0.02, 0.98, 25):
        assert h.sparsity_at(h.threshold_for(s)) == pytest.approx(s, abs=1e-9)
    # And against the data, at arbitrary t.
    x = sample(kind, seed=3)
    for t in np.quantile(np.abs(x), [0.05, 0.3, 0.6, 0.95]):
        assert abs(h.sparsity_at(float(t)) - achieved(x, t)) <= 0.005
    assert h.sparsity_at(np.inf) == 1.0
    values = [h.sparsity_at(t) for t in np.geomspace(1e-6, 1e6, 50)]
    assert values == sorted(values)


def test_merge_equals_histogram_of_concatenation():
    a, b = sample("laplace", 50_000, seed=1), sample("heavy", 30_000, seed=2)
    ha, hb, hab = AbsHistogram(), AbsHistogram(), AbsHistogram()
    ha.add(a)
    hb.add(b)
    hab.add(np.concatenate([a, b]))
    ha.merge(hb)
    np.testing.assert_array_equal(ha.counts, hab.counts)
    assert ha.total == 80_000
    # Order does not matter.
    hba = AbsHistogram()
    hba.add(b)
    hba.merge(AbsHistogram(np.bincount([], minlength=BINS)))
    h_a = AbsHistogram()
    h_a.add(a)
    hba.merge(h_a)
    np.testing.assert_array_equal(hba.counts, hab.counts)
    assert hba.threshold_for(0.4) == hab.threshold_for(0.4)


def test_natural_zeros_are_counted():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(100_000).astype(np.float32)
    zero = rng.random(x.size) < 0.37
    x[zero] = 0.0
    x[zero & (rng.random(x.size) < 0.5)] = -0.0   # negative zero is a zero too
    h = AbsHistogram()
    h.add(x)
    assert h.zeros == pytest.approx(zero.mean(), abs=1e-12)
    assert h.sparsity_at(0.0) == h.zeros
    # A target the zeros already meet needs no threshold.
    assert h.threshold_for(0.2) == 0.0
    assert h.threshold_for(zero.mean()) == 0.0
    # Above it, the threshold covers the zeros plus the smallest non-zeros.
    for s in (0.5, 0.8):
        t = h.threshold_for(s)
        assert t > 0
        assert abs(achieved(x, t) - s) <= 0.005


def test_float16_input_and_empty_histogram():
    h = AbsHistogram()
    assert h.total == 0 and h.zeros == 0.0
    assert h.threshold_for(0.5) == 0.0 and h.sparsity_at(1.0) == 0.0
    x = np.random.default_rng(5).standard_normal(50_000).astype(np.float16)
    h.add(x)
    t = h.threshold_for(0.5)
    assert abs(achieved(x.astype(np.float32), t) - 0.5) <= 0.005


def reference_bin(v: float) -> int:
    """The bin of |v| from its value, not its bits: 64 bins per octave from the exponent and the
    first 6 bits of the mantissa (math.frexp), subnormals by their multiple of 2^-132, inf at
    the first non-finite bin (NaN checked separately)."""
    import math

    a = abs(v)
    if math.isinf(a):
        return 255 * 64
    if a < 2.0 ** -126:                      # zero and subnormals: exponent field 0
        return math.floor(a * 2.0 ** 132)    # mantissa (a / 2^-149) >> 17
    m, e = math.frexp(a)                     # a = m * 2^e, m in [0.5, 1)
    return (e + 126) * 64 + math.floor((2 * m - 1) * 64)


def edge_values() -> np.ndarray:
    f32 = np.float32
    powers = [f32(2.0) ** k for k in range(-149, 128)]
    near = [np.nextafter(p, f32(0)) for p in powers] + [np.nextafter(p, f32(np.inf)) for p in powers]
    special = [0.0, -0.0, np.finfo(f32).max, np.finfo(f32).tiny, np.nextafter(np.finfo(f32).tiny, f32(0)),
               np.finfo(f32).smallest_subnormal, 1.0, 1.5, 1.984375, 1.99999, 3.0, 1e-40, 1e38]
    x = np.array(powers + near + special, dtype=f32)
    return np.concatenate([x, -x])


def test_bin_counts_equal_the_reference_formula_on_edge_values():
    from sparsecc.calibration import NONFINITE_BIN, bin_counts

    x = edge_values()
    for v in x:                           # one value at a time: its count lands in its bin
        counts = bin_counts(np.array([v], np.float32))
        assert counts.sum() == 1 and counts[reference_bin(float(v))] == 1, (float(v), np.flatnonzero(counts))
    expected = np.bincount([reference_bin(float(v)) for v in x], minlength=BINS)
    np.testing.assert_array_equal(bin_counts(x), expected)
    # inf and NaN (any sign, any payload) in the non-finite bins, never below
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF], np.uint32).view(np.float32)
    special = np.concatenate([nans, np.array([np.inf, -np.inf], np.float32)])
    counts = bin_counts(special)
    # the infinities, and the NaN whose payload lies below the 6 mantissa bits kept, share inf's bin
    assert counts[NONFINITE_BIN:].sum() == len(special) and counts[NONFINITE_BIN] == 3


def test_bin_counts_equal_masking_the_sign_then_shifting_on_every_bit_pattern_kind():
    """Against the formula it replaces (|x| by masking the sign bit, then the shift), on random
    bit patterns of every exponent (NaN and inf included) and float16/float64 input."""
    from sparsecc.calibration import _SHIFT, bin_counts

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).reshape(300, 1000)[:, ::3]   # not contiguous
    masked = np.ascontiguousarray(x).view(np.uint32) & np.uint32(0x7FFFFFFF)
    np.testing.assert_array_equal(bin_counts(x), np.bincount((masked >> _SHIFT).ravel(), minlength=BINS))
    for other in (np.float16, np.float64):
        y = rng.normal(0, 3, 5000).astype(other)
        ref = np.ascontiguousarray(y, dtype=np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
        np.testing.assert_array_equal(bin_counts(y), np.bincount(ref >> _SHIFT, minlength=BINS))
