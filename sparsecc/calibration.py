"""Streaming statistics of |x| for activation tensors.

`AbsHistogram` bins |x| by the top bits of its float32 pattern: 64 bins per power of two
over the whole float32 range (16384 bins, ~1% relative width). Binning is a shift and a
bincount, counts are exact integers, and two histograms merge by addition: memory stays
fixed whatever the amount of data, and results do not depend on batch order.

`collect` streams feeds through ONNX Runtime with only the wanted tensors as extra outputs
and keeps one histogram per tensor; results are cached on disk under a key made of the
exact saved model, the data and the tensor list. A `Collector` can also measure every N-th
window only, and `shifted` carries what such a measurement changed (a refine round behind
new thresholds) over to the statistics of all windows.

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
from sparsecc.model_io import atomic_write, file_lock, fingerprint, remove_unused
from sparsecc.stepgraph import is_step_graph
from sparsecc.runtime import load_session, saved_copy, values_by_name

_SHIFT = 17                     # keep 8 exponent + 6 mantissa bits: 64 bins per octave
BINS = 1 << (31 - _SHIFT)       # 16384
CACHE_VERSION = "2"   # 2: keyed by the calibration copy (t as inputs) and the t values


def _bin_edges() -> np.ndarray:
    """Lower edge of every bin, plus the end of the last one (float64)."""
    bits = (np.arange(BINS + 1, dtype=np.int64) << _SHIFT).clip(max=0x7F7FFFFF).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


EDGES = _bin_edges()
NONFINITE_BIN = 0x7F800000 >> _SHIFT   # from here on: inf and NaN (exponent bits all ones)


def bin_counts(x: np.ndarray) -> np.ndarray:
    """Counts of |x| per bin: the bin is the float32 pattern of |x| shifted right by _SHIFT.
    Shifting the signed pattern instead keeps the sign as bit 14 (bin + BINS for negative x),
    so one shift straight into bincount's index type and a fold of the two halves does it,
    with no mask and no intermediate array."""
    bits = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    index = np.right_shift(bits, _SHIFT, out=np.empty(bits.shape, np.intp), casting="unsafe")
    counts = np.bincount(index, minlength=2 * BINS)
    return counts[:BINS] + counts[BINS:]


class AbsHistogram:
    """Counts of |x| in fixed log-spaced bins; bin 0 holds zeros (and denormals)."""

    def __init__(self, counts: np.ndarray | None = None):
        self.counts = np.zeros(BINS, np.int64) if counts is None else counts.astype(np.int64)

    def add(self, x: np.ndarray) -> None:
        self.counts += bin_counts(x)

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
    with Collector(model, tensors, source, cache_dir) as collector:
        return collector.measure(desc)[0]


class Collector:
    """Measures the statistics of `tensors` as often as the model's thresholds change, from one
    ONNX Runtime session: the model is cut to what the wanted tensors need (an LM head after
    them is not run), they are its only outputs, and every Threshold's t is an input, fed from
    the model's nodes at each `measure` (so a refinement round needs no new copy or session).
    The session is made at the first measurement not found in the cache."""

    def __init__(self, model: ir.Model, tensors: list[str], source: FeedSource, cache_dir: Path | None = None):
        self.model, self.source = model, source
        self.tensors = sorted(set(tensors))
        self.scores = _scores(model, self.tensors)
        self.fetch = sorted({self.scores[name][0] if name in self.scores else name for name in self.tensors})
        self.cache_dir = cache_dir if source.key() is not None else None
        self._stack = contextlib.ExitStack()
        self._session = None

    def __enter__(self) -> Collector:
        copy, self._levels = _calibration_copy(self.model, self.fetch)
        self.files = self._stack.enter_context(saved_copy(copy))
        # the scales are in the saved model too; named here so a key never depends on that
        scaled = [f"{name}={hashlib.sha256(self.scores[name][1].tobytes()).hexdigest()}"
                  for name in self.tensors if name in self.scores]
        self._key = None if self.cache_dir is None else \
            [CACHE_VERSION, fingerprint(self.files), self.source.key(), *self.tensors, *scaled]
        return self

    def __exit__(self, *exc) -> None:
        self._session = None
        self._stack.close()

    def measure(self, desc: str = "calibrating", every: tuple[int, ...] = (1,)) -> list[dict[str, AbsHistogram]]:
        """The histograms with the model's thresholds as they are now: for each stride in
        `every`, those over every such window of the source (1: all, 4: windows 0, 4, 8, ...),
        all from one pass over the windows any of them needs."""
        levels = {name: node.inputs[1].const_value.numpy() for name, node in self._levels.items()}
        caches = [self._cache_path(levels, step) for step in every]
        if caches[0] is None:
            return self._measure(levels, every, desc)
        found: dict[int, dict[str, AbsHistogram]] = {}
        with contextlib.ExitStack() as held:
            try:   # one lock per pass, its first entry's: the dense pass, stride 1 first, shares it with any other
                held.enter_context(file_lock(caches[0], waiting=lambda: log(
                    f"{desc}: waiting for another process computing {caches[0].name}")))
            except OSError as exc:   # an unwritable cache folder: calibrate without it
                log(f"warning: {desc}: cannot use the calibration cache {caches[0].parent} ({exc.strerror}); "
                    "calibrating without it")
                return self._measure(levels, every, desc)
            for step, cache in zip(every, caches):
                if cache.exists():
                    cached = _read_cache(cache, len(self.tensors))
                    if cached is not None:
                        log(f"{desc}: reusing cached statistics {cache.name}")
                        STATS["reused"] += 1
                        found[step] = {name: AbsHistogram(counts) for name, counts in zip(self.tensors, cached)}
                        continue
                    log(f"warning: {desc}: cached statistics {cache} are unreadable (corrupt or truncated); "
                        "recomputing them")
            missing = [step for step in every if step not in found]
            for step, hists in zip(missing, self._measure(levels, tuple(missing), desc) if missing else []):
                found[step] = hists
                arrays = {f"h{i}": hists[name].counts for i, name in enumerate(self.tensors)}
                cache = caches[every.index(step)]
                try:
                    atomic_write(cache, lambda f: np.savez_compressed(f, **arrays))
                except (OSError, SparseccError) as exc:
                    log(f"warning: {desc}: cannot write the calibration cache {cache} ({exc}); continuing without it")
        return [found[step] for step in every]

    def _measure(self, levels: dict[str, np.ndarray], every: tuple[int, ...], desc: str) -> list[dict[str, AbsHistogram]]:
        if self._session is None:
            # no spinning: binning between runs needs the core an idle ORT thread would spin on
            # (twice the wall time per window with it on 2 shared cores; RESULTS.md, 2026-12-07)
            self._session = load_session(self.files[0], spinning=False)
        return _measure(self._session, self.tensors, self.fetch, self.scores, self.source, levels, every, desc)

    def _cache_path(self, levels: dict[str, np.ndarray], every: int = 1) -> Path | None:
        """Where statistics of exactly this saved model, data (every `every`-th window), tensor
        list and t values are cached."""
        if self._key is None:
            return None
        digest = hashlib.sha256()
        for name in sorted(levels):
            t = levels[name]
            digest.update(f"{name}:{t.dtype}:{t.shape}:".encode() + t.tobytes())
        windows = [] if every == 1 else [f"every {every} windows"]
        key = hashlib.sha256("\n".join([*self._key, *windows, digest.hexdigest()]).encode()).hexdigest()
        return Path(self.cache_dir) / f"hist-{key[:32]}.npz"


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


def _calibration_copy(model: ir.Model, fetch: list[str]) -> tuple[ir.Model, dict[str, ir.Node]]:
    """A copy of `model` (sharing its tensors) whose outputs are `fetch` and nothing else, less
    the nodes those do not need, with the t of every Threshold as a graph input; and t input
    name -> the Threshold of `model` it is fed from."""
    missing = [name for name in fetch if name not in values_by_name(model.graph)]
    if missing:
        raise SparseccError(f"tensor {missing[0]!r} is not in the model")
    copy = model.clone()
    graph = copy.graph
    values = values_by_name(graph)
    # a step graph keeps its outputs: its session carries new_state.i from step to step
    kept = list(graph.outputs) if is_step_graph(model) else []
    graph.outputs.clear()
    graph.outputs.extend(kept + [values[name] for name in fetch if values[name] not in kept])
    remove_unused(graph)
    originals = {node.name: node for node in model.graph if ops.is_threshold(node)}
    levels = {}
    for node in graph:
        t = node.inputs[1] if ops.is_threshold(node) else None
        if t is not None and t.name in graph.initializers and t.name not in levels:
            del graph.initializers[t.name]
            graph.inputs.append(t)
            levels[t.name] = originals[node.name]
    return copy, levels


def _measure(session, tensors: list[str], fetch: list[str], scores: dict, source: FeedSource,
             levels: dict[str, np.ndarray], every: tuple[int, ...], desc: str) -> list[dict[str, AbsHistogram]]:
    sets = [{name: AbsHistogram() for name in tensors} for _ in every]
    inputs = [i.name for i in session.get_inputs() if i.name not in levels]
    runs = sum(1 for i in range(len(source)) if any(i % step == 0 for step in every))
    feeds = ((feed, [hists for step, hists in zip(every, sets) if i % step == 0])
             for i, feed in enumerate(source.feeds(inputs)))
    for feed, into in bar(((f, h) for f, h in feeds if h), total=runs, desc=desc):
        arrays = dict(zip(fetch, session.run(fetch, feed | levels)))
        for name in tensors:
            if name in scores:
                tensor, scale = scores[name]
                counts = bin_counts(_scaled(arrays[tensor], scale, name))
            else:
                counts = bin_counts(arrays[name])
            if counts[NONFINITE_BIN:].any():
                raise SparseccError(f"{desc}: tensor {name!r} has NaN or infinite values on the calibration data; "
                                    "check the feeds (or the model's numerics on them)")
            for hists in into:
                hists[name].counts += counts
    STATS["computed"] += len(sets)
    return sets


def shifted(full: AbsHistogram, base: AbsHistogram, now: AbsHistogram) -> AbsHistogram:
    """|x| over all windows as a round measured on a subset of them sees it: the distribution
    of `full` (all windows, earlier thresholds) moved by what changed on the subset, `now` less
    `base` (the same windows under the earlier thresholds), so the subset's own sampling noise
    cancels (a difference estimator of the cumulative distribution, kept monotone), in counts
    of `full`'s total."""
    def cdf(h: AbsHistogram) -> np.ndarray:
        return np.cumsum(h.counts) / max(h.total, 1)

    cum = np.clip(np.maximum.accumulate(cdf(full) + cdf(now) - cdf(base)), 0.0, 1.0)
    cum = np.rint(cum * full.total).astype(np.int64)
    cum[-1] = full.total
    return AbsHistogram(np.diff(cum, prepend=0))


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


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSECC_CACHE_DIR") or Path.home() / ".cache" / "sparsecc")
