"""Symmetric integer quantization of weights (no zero point, so zero stays exactly zero).

A [K, N] weight (x @ W: K input channels, N output neurons) gets one scale per output neuron,
or with `group` > 0 one per block of `group` input channels per neuron (finer, for 4 bits):

    scale = max |w| / qmax,  q = round_half_even(w / scale) in [-qmax, qmax],  qmax = 2^(bits-1) - 1

so |q x scale - w| <= scale / 2. An all-zero block gets scale 1 (and q = 0), as does a
block whose peak is so small (subnormal) that peak / qmax underflows.
"""
from __future__ import annotations

import numpy as np

from sparsecc.errors import SparseccError


def _blocks(w: np.ndarray, group: int) -> np.ndarray:
    """[K, N] -> [K / group, group, N] (group 0: one block of all K)."""
    k, n = w.shape
    group = group or k
    if k % group:
        raise SparseccError(f"group size {group} does not divide the {k} input channels; choose a divisor of {k}")
    return w.reshape(k // group, group, n)


def quantize(w: np.ndarray, bits: int = 8, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(q as int8 [K, N], scale as float32 [K / group, N]) for a float [K, N] weight."""
    if bits not in (4, 8):
        raise SparseccError(f"weights quantize to 8 or 4 bits (got {bits})")
    qmax = 2 ** (bits - 1) - 1
    blocks = _blocks(np.asarray(w, np.float32), group)
    peak = np.abs(blocks).max(axis=1)
    scale = (peak / qmax).astype(np.float32)
    scale[scale == 0] = 1.0  # all-zero blocks (or subnormal peaks, which quantize to zero anyway)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax, qmax).astype(np.int8)
    return q.reshape(w.shape), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 [K, N] from `quantize`'s output (the group size follows from the scale's shape)."""
    k, n = q.shape
    blocks = q.reshape(scale.shape[0], k // scale.shape[0], n).astype(np.float32)
    return (blocks * scale[:, None, :]).reshape(k, n)
