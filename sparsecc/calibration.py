"""Streaming statistics of |x| for activation tensors.

`AbsHistogram` bins |x| by the top bits of its float32 pattern: 64 bins per power of two
over the whole float32 range (16384 bins, ~1% relative width). Binning is a shift and a
bincount, counts are exact integers, and two histograms merge by addition: memory stays
fixed whatever the amount of data, and results do not depend on batch order.

`collect` streams feeds through ONNX Runtime with only the wanted tensors as extra outputs
and keeps one histogram per tensor; results are cached on disk under a key made of the
exact saved model, the data and the tensor list.

A weight-aware threshold (ops.set_score_scale) is calibrated on its score |x_i| * c_i, not
on |x|: `statistic(node)` names what a Threshold's level is calibrated on (its input tensor,
or `score:<threshold>`), and `collect` takes either kind of name, scaling the tensor per
channel for a score. Every threshold pass keys its histograms by that one name.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sparsecc import ops
from sparsecc.data import FeedSource
from sparsecc.errors import SparseccError
from sparsecc.flag_configs import MAX_REFINE, REFINE  # noqa: F401 (the passes' bound on refine)
from sparsecc.progress import bar, log
from sparsecc.model_io import atomic_write, file_lock, fingerprint
from sparsecc.runtime import load_session, saved_copy

_SHIFT = 17                     # keep 8 exponent + 6 mantissa bits: 64 bins per octave
BINS = 1 << (31 - _SHIFT)       # 16384
CACHE_VERSION = "1"


def _bin_edges() -> np.ndarray:
    """Lower edge of every bin, plus the end of the last one (float64)."""
    bits = (np.arange(BINS + 1, dtype=np.int64) << _SHIFT).clip(max=0x7F7FFFFF).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


EDGES = _bin_edges()
NONFINITE_BIN = 0x7F800000 >> _SHIFT   # from here on: inf and NaN (exponent bits all ones)


class AbsHistogram:
    """Counts of |x| in fixed log-spaced bins; bin 0 holds zeros (and denormals)."""

    def __init__(self, counts: np.ndarray | None = None):
        self.counts = np.zeros(BINS, np.int64) if counts is None else counts.astype(np.int64)

    def add(self, x: np.ndarray) -> None:
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0x7FFFFFFF)
        self.counts += np.bincount((bits >> _SHIFT).ravel(), minlength=BINS)[:BINS]

    def merge(self, other: AbsHistogram) -> None:
        self.counts += other.counts

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def nonfinite(self) -> int:
        return int(self.counts[NONFINITE_BIN:].sum())

    @property
    def zeros(self) -> float:
        """Fraction of exact zeros: the natural sparsity."""
        return float(self.counts[0]) / max(self.total, 1)

    def threshold_for(self, sparsity: float) -> float:
        """Smallest t with fraction(|x| <= t) >= sparsity, linear within a bin."""
        total = self.total
        target = sparsity * total
        if total == 0 or target <= self.counts[0]:
            return 0.0
        cum = np.cumsum(self.counts)
        b = int(np.searchsorted(cum, target))
        below = cum[b] - self.counts[b]
        frac = (target - below) / self.counts[b]
        return float(EDGES[b] + frac * (EDGES[b + 1] - EDGES[b]))

    def sparsity_at(self, t: float) -> float:
        """Fraction of |x| <= t (the inverse of threshold_for, same interpolation)."""
        total = self.total
        if total == 0:
            return 0.0
        if t <= 0:
            return self.zeros
        b = int(np.searchsorted(EDGES, t, side="right")) - 1
        b = min(max(b, 0), BINS - 1)
        below = self.counts[:b].sum()
        frac = (t - EDGES[b]) / (EDGES[b + 1] - EDGES[b]) if b > 0 else 1.0
        return float(below + min(frac, 1.0) * self.counts[b]) / total


# Statistics this process computed and reused from the cache (a sweep cell reports them).
STATS = {"computed": 0, "reused": 0}


def collect(model: ir.Model, tensors: list[str], source: FeedSource, cache_dir: Path | None = None,
            desc: str = "calibrating") -> dict[str, AbsHistogram]:
    """One histogram per name over all feeds of `source`: of |x| for a tensor, of the score
    |x_i| * c_i for a weight-aware threshold's `statistic`. With `cache_dir`, an entry is
    computed by one process at a time (others wait for it, then read it)."""
    tensors = sorted(set(tensors))
    scores = _scores(model, tensors)
    fetch = sorted({scores[name][0] if name in scores else name for name in tensors})
    with saved_copy(model, fetch) as files:
        # the scales are in the saved model too; named here so a key never depends on that
        scaled = [f"{name}={hashlib.sha256(scores[name][1].tobytes()).hexdigest()}" for name in tensors if name in scores]
        cache = _cache_path(cache_dir, files, source, tensors + scaled)
        if cache is None:
            return _measure(files[0], tensors, fetch, scores, source, desc)
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(file_lock(cache, waiting=lambda: log(
                    f"{desc}: waiting for another process computing {cache.name}")))
            except OSError as exc:   # an unwritable cache folder: calibrate without it
                log(f"warning: {desc}: cannot use the calibration cache {cache.parent} ({exc.strerror}); "
                    "calibrating without it")
                return _measure(files[0], tensors, fetch, scores, source, desc)
            if cache.exists():
                cached = _read_cache(cache, len(tensors))
                if cached is not None:
                    log(f"{desc}: reusing cached statistics {cache.name}")
                    STATS["reused"] += 1
                    return {name: AbsHistogram(counts) for name, counts in zip(tensors, cached)}
                log(f"warning: {desc}: cached statistics {cache} are unreadable (corrupt or truncated); "
                    "recomputing them")
            hists = _measure(files[0], tensors, fetch, scores, source, desc)
            arrays = {f"h{i}": hists[name].counts for i, name in enumerate(tensors)}
            try:
                atomic_write(cache, lambda f: np.savez_compressed(f, **arrays))
            except (OSError, SparseccError) as exc:
                log(f"warning: {desc}: cannot write the calibration cache {cache} ({exc}); continuing without it")
            return hists


def _read_cache(path: Path, count: int) -> list[np.ndarray] | None:
    """The `count` histograms of a cache entry, or None when it is not exactly that: unreadable,
    truncated (zip CRCs), corrupt, or of another shape, so a bad entry is never trusted."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if sorted(data.files) != sorted(f"h{i}" for i in range(count)):
                return None
            counts = [data[f"h{i}"] for i in range(count)]
    except Exception:   # zipfile.BadZipFile, OSError, ValueError, EOFError, ...: all mean unusable
        return None
    if any(c.shape != (BINS,) or c.dtype != np.int64 or (c < 0).any() for c in counts):
        return None
    return counts


def _measure(model_file: Path, tensors: list[str], fetch: list[str], scores: dict, source: FeedSource,
             desc: str) -> dict[str, AbsHistogram]:
    session = load_session(model_file)
    hists = {name: AbsHistogram() for name in tensors}
    inputs = [i.name for i in session.get_inputs()]
    for feed in bar(source.feeds(inputs), total=len(source), desc=desc):
        arrays = dict(zip(fetch, session.run(fetch, feed)))
        for name in tensors:
            if name in scores:
                tensor, scale = scores[name]
                hists[name].add(_scaled(arrays[tensor], scale, name))
            else:
                hists[name].add(arrays[name])
            if hists[name].nonfinite:
                raise SparseccError(f"{desc}: tensor {name!r} has NaN or infinite values on the calibration data; "
                                    "check the feeds (or the model's numerics on them)")
    STATS["computed"] += 1
    return hists


SCORE_PREFIX = "score:"


def statistic(node: ir.Node) -> str:
    """What a Threshold's level is calibrated on: the name of its input tensor, or for a
    weight-aware threshold `score:<its name>`, the score |x_i| * c_i of that input."""
    return f"{SCORE_PREFIX}{node.name}" if ops.score_scale(node) is not None else node.inputs[0].name


def _scores(model: ir.Model, names: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """score name -> (the tensor, its per-channel scale) for the score statistics among `names`."""
    wanted = {name[len(SCORE_PREFIX):]: name for name in names if name.startswith(SCORE_PREFIX)}
    if not wanted:
        return {}
    out = {}
    for node in model.graph:
        if node.name in wanted and ops.is_threshold(node) and ops.score_scale(node) is not None:
            out[wanted[node.name]] = (node.inputs[0].name, ops.score_scale(node))
    missing = sorted(set(wanted.values()) - set(out))
    if missing:
        raise SparseccError(f"{missing[0]!r} names no weight-aware Threshold of the model (run weight-scores "
                            "before asking for its score statistics)")
    return out


def _scaled(x: np.ndarray, scale: np.ndarray, name: str) -> np.ndarray:
    if x.shape[-1:] != scale.shape:
        raise SparseccError(f"{name}: the tensor's last axis has {x.shape[-1:]} channels, its score scale "
                            f"{scale.size}; re-run weight-scores on this model")
    return np.abs(np.asarray(x, np.float32)) * scale


def _cache_path(cache_dir: Path | None, model_files: list[Path], source: FeedSource, tensors: list[str]) -> Path | None:
    """Where statistics of exactly this saved model, data and tensor list are cached."""
    data_key = source.key()
    if cache_dir is None or data_key is None:
        return None
    parts = [CACHE_VERSION, fingerprint(model_files), data_key, *tensors]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return Path(cache_dir) / f"hist-{key[:32]}.npz"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSECC_CACHE_DIR") or Path.home() / ".cache" / "sparsecc")
