"""Learning the thresholds (symmetric bands, Threshold(x, t) zeroes |x| <= t) by gradient
descent, for finetune-bands. Needs PyTorch.

- Straight-through estimator: the forward pass uses the hard mask, x * (|x| > t), so the
  loss is the loss of the model as compiled; the backward pass differentiates t through
  the smooth surrogate sigmoid((|x| - t) / tau), tau = temperature x a scale of the
  threshold's input (the median |x|), so the gradient says what moving the band would cost.
  (A weight-aware threshold learns its score level the same way, on the score |x| * c.)
  The gradient to x is the hard mask's (|x| is detached in the surrogate).
- t = exp(log t), so t stays positive and a step is a relative change of t; Adam with one
  second moment for all thresholds, so a step keeps the thresholds' gradients in proportion.
- The pass holds the model-wide MAC-weighted sparsity at its entry value by projection:
  after each step one common factor on all t puts it back (see passes/finetune_bands.py),
  so training moves sparsity between sites instead of just giving it up.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-12


@dataclasses.dataclass
class BandState:
    """What training changes: log t and Adam's moments, one entry per trainable threshold."""

    log_t: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor

    @classmethod
    def start(cls, t: list[float]) -> BandState:
        log_t = torch.log(torch.tensor(t, dtype=torch.float64))
        return cls(log_t, torch.zeros_like(log_t), torch.zeros_like(log_t))

    def to_json(self) -> list[list[float]]:
        return [[float(a), float(b), float(c)] for a, b, c in zip(self.log_t, self.m, self.v)]

    @classmethod
    def from_json(cls, rows: list[list[float]]) -> BandState:
        a = torch.tensor(rows, dtype=torch.float64)
        return cls(a[:, 0].clone(), a[:, 1].clone(), a[:, 2].clone())

    def adam_step(self, grad: torch.Tensor, lr: float, step: int) -> None:
        """One Adam update (step counts from 1), written out so its state can be checkpointed.
        The second moment is shared by all thresholds (the mean of the squared gradients, kept
        per entry only for the checkpoint's layout): per-entry moments would move every t by
        about lr whatever its gradient, and the differences between the gradients are what
        reallocates sparsity."""
        b1, b2 = ADAM_BETAS
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * (grad * grad).mean()
        self.log_t = self.log_t - lr * (self.m / (1 - b1 ** step)) / ((self.v / (1 - b2 ** step)).sqrt() + ADAM_EPS)

    def shift(self, factor: float) -> None:
        """Scale every t by `factor` (the projection back onto the sparsity target)."""
        self.log_t = self.log_t + math.log(factor)


def ste_threshold(index: dict[str, int], level: torch.Tensor, tau: torch.Tensor, scales: list):
    """A Threshold function for TorchGraph.run: hard mask forward, sigmoid surrogate backward
    for the thresholds in `index` (node name -> position in `level`), the op as is for the
    others. A weight-aware threshold (scales[i], its per-channel c, not None) keeps x where
    |x| > level / c, i.e. where its score |x| * c > level, and its surrogate is on the score."""
    from sparsecc.torch_eval import hard_threshold

    def threshold(node, x, t_const):
        i = index.get(node.name)
        if i is None:
            return hard_threshold(node, x, t_const)
        magnitude, c = x.detach().abs(), scales[i]
        t = level[i].detach() if c is None else level[i].detach() / c   # c = 0: t = inf, always dropped
        score = magnitude if c is None else magnitude * c.to(x.dtype)
        soft = torch.sigmoid((score - level[i].to(x.dtype)) / tau[i].to(x.dtype))
        mask = (magnitude > t.to(x.dtype)).to(x.dtype) + (soft - soft.detach())   # value: exactly the hard mask
        return x * mask
    return threshold


def fixed_threshold(values: dict[str, np.ndarray]):
    """A Threshold function with the given t per node name (the op itself, hard mask)."""
    from sparsecc.torch_eval import hard_threshold

    def threshold(node, x, t_const):
        return hard_threshold(node, x, torch.from_numpy(values[node.name]).to(x.dtype))
    return threshold


def task_loss(output: torch.Tensor, feed: dict, dense: torch.Tensor | None) -> torch.Tensor:
    """Next-token cross-entropy for a token-id model (dense is None), else the squared error
    against the dense output."""
    if dense is not None:
        return ((output - dense) ** 2).mean()
    ids = torch.from_numpy(np.asarray(next(iter(feed.values()))))
    logits = output[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
