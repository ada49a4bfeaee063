"""Accuracy and sparsity metrics, accumulated window by window (nothing large is kept)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] under logits[:-1] (one window, float64)."""
    z = logits.reshape(-1, logits.shape[-1])[:-1].astype(np.float64)
    target = ids.reshape(-1)[1:]
    peak = z.max(axis=1, keepdims=True)
    logsumexp = np.log(np.exp(z - peak).sum(axis=1)) + peak[:, 0]
    return logsumexp - z[np.arange(len(target)), target]


@dataclasses.dataclass
class Perplexity:
    nll: float = 0.0
    tokens: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray) -> None:
        losses = token_nll(logits, ids)
        self.nll += float(losses.sum())
        self.tokens += len(losses)

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


@dataclasses.dataclass
class OutputError:
    """Compiled vs reference outputs: max |diff|, mean per-position cosine, top-1 agreement."""

    max_abs: float = 0.0
    cosine_sum: float = 0.0
    agree: int = 0
    positions: int = 0

    def add(self, out: np.ndarray, ref: np.ndarray) -> None:
        out = out.reshape(-1, out.shape[-1]).astype(np.float64)
        ref = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(out - ref).max()))
        norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
        self.cosine_sum += float(((out * ref).sum(axis=1) / np.maximum(norms, 1e-30)).sum())
        self.agree += int((out.argmax(axis=1) == ref.argmax(axis=1)).sum())
        self.positions += len(out)

    def to_dict(self) -> dict:
        n = max(self.positions, 1)
        return {"max_abs": self.max_abs, "mean_cosine": self.cosine_sum / n, "top1_agreement": self.agree / n,
                "positions": self.positions}


@dataclasses.dataclass
class Zeros:
    """Exact-zero count of one tensor over all windows."""

    zeros: int = 0
    elements: int = 0

    def add(self, x: np.ndarray) -> None:
        self.zeros += int(x.size - np.count_nonzero(x))
        self.elements += int(x.size)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0
