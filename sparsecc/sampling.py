"""Text sampled from the model itself, as training and calibration data (LLM-QAT's
"data-free" data): windows of token ids generated one token at a time from a causal LM's own
next-token distribution, so recovery learns the model, not one corpus.

Each window starts with a given first token (the BOS of the calibration windows) and is
extended by sampling softmax(logits / temperature) at its last position (temperature 0:
argmax). The model runs in PyTorch (sparsecc.torch_eval), every Threshold open, so the samples
come from the dense model; a window graph sees the whole prefix at each step (no KV cache),
several windows batched. Each window draws from its own NumPy generator, seeded by (`seed`, its
index), on float64 probabilities, so the same model, seed and device give the same windows
whatever the batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sparsecc.data import FeedSource, feeds_for_ids
from sparsecc.errors import SparseccError
from sparsecc.progress import bar, log


def open_threshold(node, x, t):
    """Every Threshold as the identity: the dense model."""
    return x


def sample_windows(graph, first: np.ndarray, seq_len: int, seed: int, temperature: float = 1.0,
                   batch: int = 16, bf16: bool = False, desc: str = "sampling") -> np.ndarray:
    """len(first) windows of `seq_len` token ids from the LM `graph` (a TorchGraph with an
    input_ids input), window i starting with token first[i]."""
    import torch

    from sparsecc.devices import autocast

    if temperature < 0:
        raise SparseccError(f"sampling temperature must be 0 or more (got {temperature})")
    streams = [np.random.default_rng((seed, i)) for i in range(len(first))]   # one per window: batching changes nothing
    rows = np.zeros((len(first), seq_len), np.int64)
    rows[:, 0] = first
    progress = bar(total=len(first) * (seq_len - 1), desc=desc, unit="token")
    with torch.no_grad(), autocast(graph.device, bf16):
        for start in range(0, len(rows), batch):
            block = rows[start:start + batch]
            for n in range(1, seq_len):
                feeds = [feeds_for_ids(row[:n], graph.inputs) for row in block]
                logits = graph.run_batch(feeds, open_threshold)[0]          # [b, 1, n, vocab]
                last = logits.reshape(len(block), n, -1)[:, -1].double().cpu().numpy()
                block[:, n] = _draw(last, temperature, np.array([streams[start + i].random() for i in range(len(block))]))
                progress.update(len(block))
    progress.close()
    return rows


def _draw(logits: np.ndarray, temperature: float, uniform: np.ndarray) -> np.ndarray:
    """One token per row of `logits` from softmax(logits / temperature) (argmax at 0), by
    inverting its CDF at the row's `uniform` draw in [0, 1)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = uniform * cdf[:, -1]
    return np.minimum((cdf < u[:, None]).sum(axis=-1), z.shape[-1] - 1)


def _read_rows(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """Cached sampled windows of exactly `shape`, or None (with a warning) for a bad entry."""
    try:
        rows = np.load(path, allow_pickle=False)
        if rows.shape == shape and rows.dtype == np.int64:
            return rows
    except Exception:   # truncated or corrupt: recomputed
        pass
    log(f"warning: cached samples {path} are unreadable (corrupt or truncated); sampling again")
    return None


class SampledWindows(FeedSource):
    """`count` windows sampled from the model at `model_path` (see sample_windows), every one
    started with `first_token` (the tokenizer's BOS). Generated on first use, cached under
    `cache_dir` by the exact model file, the options and the device kind."""

    def __init__(self, model_path: str | os.PathLike, count: int, seq_len: int, first_token: int,
                 seed: int = 0, temperature: float = 1.0, device: str = "auto",
                 cache_dir: Path | None = None):
        from sparsecc import devices
        from sparsecc.model_io import fingerprint, model_files

        if count < 1:
            raise SparseccError(f"the number of sampled windows must be at least 1 (got {count})")
        if temperature < 0:
            raise SparseccError(f"sampling temperature must be 0 or more (got {temperature})")
        self.path, self.count, self.seq_len = Path(model_path), count, seq_len
        self.first, self.seed, self.temperature = int(first_token), seed, temperature
        self.device = devices.resolve(device, "sampling from the model")
        options = {"count": count, "seq_len": seq_len, "first": self.first, "seed": seed,
                   "temperature": temperature, "device": self.device.type}
        self._key = hashlib.sha256((fingerprint(model_files(self.path)) + json.dumps(options, sort_keys=True))
                                   .encode()).hexdigest()
        self.cache = Path(cache_dir) / f"samples-{self._key[:32]}.npy" if cache_dir is not None else None
        self._rows: np.ndarray | None = None

    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            if self.cache is not None and self.cache.is_file():
                self._rows = _read_rows(self.cache, (self.count, self.seq_len))
            if self._rows is None:
                from sparsecc import model_io
                from sparsecc.torch_eval import TorchGraph

                graph = TorchGraph(model_io.load_model(self.path), device=self.device)
                if "input_ids" not in graph.inputs:
                    raise SparseccError(f"{self.path} has no input_ids input: only a token-id language model "
                                        "can sample its own text; drop --calib-samples")
                self._rows = sample_windows(graph, np.full(self.count, self.first), self.seq_len, self.seed,
                                            self.temperature, desc="sampling calibration text")
                if self.cache is not None:
                    _atomic_save(self.cache, self._rows)
        return self._rows

    def __len__(self) -> int:
        return self.count

    def feeds(self, input_names):
        for row in self.rows:
            yield feeds_for_ids(row, input_names)

    def key(self) -> str:
        return self._key

    def describe(self) -> dict:
        return {"kind": "sampled", "model": str(self.path), "windows": self.count, "seq_len": self.seq_len,
                "tokens": self.count * self.seq_len, "first_token": self.first, "seed": self.seed,
                "temperature": self.temperature, "device": self.device.type}


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
