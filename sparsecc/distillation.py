"""Training a model's weights with its thresholds in place, against the model itself with its
thresholds open as teacher (the distill pass). Needs PyTorch.

- Student and teacher are one TorchGraph: the teacher runs with the entry weights and every
  Threshold open, the student with the trainable weights (torch Parameters) and its
  thresholds as the hard op. The gradient passes the mask where a value was kept
  (`masked`) or straight through it (`straight`, Q-Sparse's estimator).
- Loss: KL(teacher || student) on the next-token distributions (softened by a temperature,
  times its square), optionally plus next-token cross-entropy; for a model whose input is not
  token ids, the squared error against the teacher's outputs.
- The thresholds follow the weights: every `recalibrate_every` steps each one's level is set
  again so that its input (or weight-aware score) keeps the sparsity it had on entry,
  measured on a few training windows with the same log-spaced histograms as calibration.
- AdamW, linear warm-up then cosine decay, gradient norm clipped at 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from sparsecc import ops
from sparsecc.calibration import BINS, _SHIFT, AbsHistogram
from sparsecc.sampling import open_threshold


def student_threshold(levels: dict, straight: bool):
    """The Threshold op with t from `levels` (node name -> t tensor, the op's own t for the
    others), compared in float32 whatever the compute type."""
    def threshold(node, x, t_const):
        t = levels.get(node.name, t_const)
        keep = x.abs().float() > t.float()
        kept = torch.where(keep, x, x.new_zeros(()))
        return x + (kept - x).detach() if straight else kept
    return threshold


def histogram_threshold(levels: dict, hists: dict, sources: dict):
    """The student's Threshold (no gradient) that also adds each input's |x| (or score |x| * c)
    to `hists[node name]`: torch counts in calibration's bins (calibration.AbsHistogram)."""
    def threshold(node, x, t_const):
        if node.name in sources:
            magnitude = x.detach().abs().float()
            scale = sources[node.name]
            if scale is not None:
                magnitude = magnitude * scale
            bins = (magnitude.view(torch.int32) >> _SHIFT).reshape(-1)
            counts = torch.bincount(bins, minlength=BINS)[:BINS]
            hists[node.name] = counts if node.name not in hists else hists[node.name] + counts
        t = levels.get(node.name, t_const)
        return torch.where(x.abs().float() > t.float(), x, x.new_zeros(()))
    return threshold


def recalibrated(graph, params: dict, windows: list[dict], thresholds: list, sparsity: dict,
                 levels: dict, scales: dict) -> dict:
    """New levels (node name -> level) at which each threshold's input keeps its entry
    sparsity, measured on `windows` with the student's weights and current thresholds."""
    hists: dict = {}
    sources = {th.node.name: scales[th.node.name] for th in thresholds}
    with torch.no_grad():
        for feed in windows:
            graph.run(feed, histogram_threshold(levels, hists, sources), params)
    return {name: AbsHistogram(counts.cpu().numpy()).threshold_for(sparsity[name]) for name, counts in hists.items()}


def t_tensor(node, level: float, device) -> torch.Tensor:
    """What the Threshold computes with for `level` (ops.threshold_array: t, or tau / c)."""
    return torch.from_numpy(np.array(ops.threshold_array(node, level), np.float32)).to(device)


def learning_rate(step: int, steps: int, peak: float, warmup: float, floor: float) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to
    `floor` x peak; `step` counts from 0."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return peak * (step + 1) / ramp
    progress = (step - ramp) / max(1, steps - ramp)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_losses(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple:
    """(KL(teacher || student) per token, softened by `temperature`, times its square;
    student's next-token cross-entropy) for logits [..., seq, vocab] and ids [..., seq]."""
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab).float()
    t = teacher.reshape(-1, vocab).float()
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1),
                                    log_target=True, reduction="batchmean") * temperature ** 2
    logits = student.reshape(*ids.shape, vocab)[..., :-1, :].reshape(-1, vocab).float()
    ce = torch.nn.functional.cross_entropy(logits, ids[..., 1:].reshape(-1))
    return kl, ce


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of one window."""
    vocab = logits.shape[-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab)[:-1].float(), ids.reshape(-1)[1:]))


def held_out(graph, params: dict, teacher: dict, windows: list[dict], levels: dict, is_lm: bool) -> dict:
    """On held-out windows: the teacher's and the student's (thresholds in place, and open)
    perplexity and the student's KL to the teacher; for a non-LM, the squared error."""
    if not windows:
        return {}
    sums = {"teacher": 0.0, "student": 0.0, "student_open": 0.0, "kl": 0.0}
    with torch.no_grad():
        for feed in windows:
            t_out = graph.run(feed, open_threshold, teacher)[0]
            s_out = graph.run(feed, student_threshold(levels, False), params)[0]
            if not is_lm:
                sums["kl"] += float(((s_out - t_out) ** 2).mean())
                continue
            o_out = graph.run(feed, open_threshold, params)[0]
            ids = torch.as_tensor(np.asarray(feed["input_ids"])).to(s_out.device)
            sums["teacher"] += next_token_nll(t_out, ids)
            sums["student"] += next_token_nll(s_out, ids)
            sums["student_open"] += next_token_nll(o_out, ids)
            sums["kl"] += float(lm_losses(s_out, t_out, ids, 1.0)[0])
    n = len(windows)
    if not is_lm:
        return {"windows": n, "squared_error": round(sums["kl"] / n, 6)}
    return {"windows": n, "kl": round(sums["kl"] / n, 6),
            **{f"ppl_{k}": round(math.exp(sums[k] / n), 4) for k in ("teacher", "student", "student_open")}}
