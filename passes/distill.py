"""distill: train the model's weights with its thresholds in place, by distillation from the
model as it was before thresholding (the same weights, every Threshold open), so the model
learns to live with its sparsity (recovery; see sparsecc.distillation for the training).

Run it after the pass that set the thresholds (calibrate-thresholds, allocate-sparsity,
greedy-blocks, sequential-search; after finetune-bands too) and before quantize-activations.
It trains float weights (`trainable_tensors`): put quantize-weights after it in a pipeline
file to ship int8 weights (in the default pipeline, quantize-weights comes first, and its
integer weights would stay as they are).

1. Entry: every threshold's sparsity on the calibration data (its statistic, as calibration
   measures it) and the model-wide MAC-weighted sparsity they give: the target.
2. Data: the calibration data's windows, all of them (`text_windows` to cap; the windows
   `--windows` kept for calibration are only a subset), the last `held_out` kept apart, plus
   `samples` windows sampled from the teacher itself (sparsecc.sampling), each started like
   the calibration windows. Each step trains on `batch` windows drawn in an order from `seed`.
3. Training: `steps` AdamW steps on the tensors `train` names; every `recalibrate_every`
   steps each threshold's level is set again so that it keeps its entry sparsity under the
   new weights.
4. Exit: the trained values are written into the model's initializers (their own dtype), the
   thresholds' inputs re-measured on the calibration data with ONNX Runtime, and one common
   factor on all levels lands the model-wide sparsity on the target: measured, not assumed.

Checkpointed every `checkpoint_every` steps in the calibration cache and resumed from there;
on the CPU, the same inputs, seed and `threads` give a byte-identical model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir

from sparsecc import devices, ops
from sparsecc.calibration import collect
from sparsecc.config import option
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, PassResult, require
from sparsecc.progress import bar, log
from sparsecc.sites import analyze, const_root
from sparsecc.threshold_search import ThresholdSearch, common_factor, scaled_levels, thresholds_by_role, threshold_sparsity, visit_order

MAX_HISTORY = 200   # loss-curve points kept in the report


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    steps: int = option(200, "optimizer steps", within="[1, inf)")
    batch: int = option(8, "windows per step", within="[1, inf)")
    lr: float = option(1e-4, "peak learning rate (AdamW)", within="(0, inf)")
    warmup: float = option(0.05, "fraction of the steps the learning rate ramps up over, from 0", within="[0, 1)")
    lr_floor: float = option(0.1, "the learning rate decays (cosine) to this fraction of the peak", within="[0, 1]")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", within="[0, inf)")
    train: Literal["all", "linear", "norms"] = option(
        "all", "tensors trained: all float initializers (but scalars), the linear sites' weights, or the "
               "1-D ones (norm scales, biases)")
    temperature: float = option(1.0, "softening of both distributions in the KL term", within="(0, inf)")
    ce_weight: float = option(0.0, "weight of next-token cross-entropy on the data, added to the KL", within="[0, inf)")
    gradient: Literal["masked", "straight"] = option(
        "masked", "gradient through a Threshold: to the kept values only, or straight through (identity)")
    recalibrate_every: int = option(20, "steps between re-settings of the thresholds' levels (0: never)",
                                    within="[0, inf)")
    recalibrate_windows: int = option(4, "training windows each re-setting measures on", within="[1, inf)")
    samples: int = option(0, "windows sampled from the teacher itself, added to the training data", within="[0, inf)")
    sample_temperature: float = option(1.0, "temperature of those samples (0: greedy)", within="[0, inf)")
    sample_batch: int = option(64, "windows sampled at a time (each token of each costs a forward pass of its prefix)",
                               within="[1, inf)")
    text_windows: int = option(0, "windows of the calibration data trained on (0: all there are)", within="[0, inf)")
    held_out: int = option(4, "calibration windows kept out of training, to report the teacher's and the "
                              "student's perplexity on", within="[0, inf)")
    seed: int = option(0, "order of the training windows; the samples' draws", within="[0, inf)")
    bf16: bool = option(False, "bfloat16 autocast (on a GPU: faster, less memory)")
    threads: int = option(1, "PyTorch CPU threads (the model is byte-identical only for the same count)",
                          within="[1, inf)")
    checkpoint_every: int = option(50, "steps between checkpoints in the calibration cache", within="[1, inf)")


class Distill(ThresholdSearch):
    """Train the weights with the thresholds in place, by distillation from the model with its thresholds open."""

    name = "distill"
    Config = DistillConfig

    needs = frozenset({"thresholds", "levels"})
    before = frozenset({"int8-events"})
    window_graphs_only = "its PyTorch evaluator runs window graphs; distill the window graph of the model instead"

    def check_ahead(self, model, ctx):
        devices.import_torch("distill")
        super().check_ahead(model, ctx)

    def check(self, model, ctx):
        nodes = [n for n in model.graph if ops.is_threshold(n)]
        require(bool(nodes), "distill found no Threshold ops: run insert-thresholds and a pass that sets them "
                             "(calibrate-thresholds, allocate-sparsity, ...) before it")
        require(any(ops.threshold_level(n) > 0 for n in nodes), "distill found every threshold at t = 0: run "
                "calibrate-thresholds (or another threshold search) before it")

    def run(self, model: ir.Model, ctx: Context) -> PassResult:
        torch = devices.import_torch("distill")
        device = devices.resolve(getattr(ctx, "device", "auto"), "distill")
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(self.config.threads)
        torch.use_deterministic_algorithms(device.type == "cpu")
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                with devices.gpu_memory("distill", f"lower batch (now {self.config.batch}) or set bf16=true"):
                    return _Run(model, ctx, self.config, device).run()
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)


def trainable_tensors(model: ir.Model, train: str) -> list[str]:
    """Initializer names `train` selects among the model's weights: the linear sites' weights
    (head included), the token embedding tables, and the 1-D float vectors the activations are
    scaled or shifted by (norm scales, biases). Constants that only shape the computation
    (rotary frequencies, masks, scalars) are not weights and never train, nor do thresholds'
    t. Weights stored as integers (quantize-weights) stay as they are."""
    from sparsecc.torch_eval import feed_dependent

    graph = model.graph
    dynamic = feed_dependent(list(graph), {v.name for v in graph.inputs})
    floats = {name for name, v in graph.initializers.items()
              if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point()}
    linear = {const_root(node.inputs[1]).name for node in analyze(graph).nodes} & floats
    embeddings, vectors = set(), set()
    for node in graph:
        reads_activations = any(v is not None and v.name in dynamic for v in node.inputs)
        for v in node.inputs:
            if v is None or v.name not in floats or not reads_activations:
                continue
            if node.op_type == "Gather" and v is node.inputs[0] and len(v.shape) == 2:
                embeddings.add(v.name)
            elif len(v.shape) == 1 and v.shape[0] != 1 and node.op_type in (
                    "Mul", "Add", "Sub", "Div", "LayerNormalization", "Gemm"):
                vectors.add(v.name)
    chosen = {"linear": linear, "norms": vectors, "all": linear | embeddings | vectors}[train]
    return sorted(chosen)


class _Run:
    """One distillation of `model` (a class only to share the run's state between its steps)."""

    def __init__(self, model: ir.Model, ctx: Context, config: DistillConfig, device):
        self.model, self.ctx, self.c, self.device = model, ctx, config, device

    def run(self) -> dict:
        import torch

        from sparsecc import distillation as dl
        from sparsecc.sampling import sample_windows
        from sparsecc.torch_eval import TorchGraph

        c, model, started = self.c, self.model, time.perf_counter()
        grouped, natural = thresholds_by_role(model)
        thresholds = [dataclasses.replace(th, group=th.node.name) for th in grouped]   # each on its own
        statistics = [th.source for th in thresholds] + [s.consumes for s in natural]
        hists = collect(model, statistics, self.ctx.calibration, self.ctx.cache_dir, desc="distill: statistics")
        entry = {th.node.name: ops.threshold_level(th.node) for th in thresholds}
        sparsity = {th.node.name: hists[th.source].sparsity_at(entry[th.node.name]) for th in thresholds}
        target = threshold_sparsity(thresholds, natural, hists, entry)
        trained = [th for th in thresholds if entry[th.node.name] > 0]
        names = trainable_tensors(model, c.train)
        if not names:
            raise SparseccError(f"distill: train={c.train} selects no float initializer of this model; "
                                "choose another `train`")

        graph = TorchGraph(model, device=self.device, trainable=set(names))
        teacher = {k: v.to(self.device) for k, v in graph.initial.items()}
        params = {k: torch.nn.Parameter(v.to(device=self.device, dtype=torch.float32).clone())
                  for k, v in graph.initial.items()}
        is_lm = "input_ids" in graph.inputs
        train_feeds, held = self._data(graph, teacher, is_lm, sample_windows)

        scales = {th.node.name: None if ops.score_scale(th.node) is None
                  else torch.from_numpy(ops.score_scale(th.node).copy()).to(self.device) for th in trained}
        levels = dict(entry)
        t_of = lambda: {th.node.name: dl.t_tensor(th.node, levels[th.node.name], self.device) for th in thresholds}
        optimizer = torch.optim.AdamW(list(params.values()), lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay)
        checkpoint = self._checkpoint_path(model, names, train_feeds)
        history, resumed = [], 0
        if checkpoint is not None and checkpoint.is_file():
            state = torch.load(checkpoint, map_location=self.device, weights_only=False)
            with torch.no_grad():
                for k, v in state["params"].items():
                    params[k].copy_(v)
            optimizer.load_state_dict(state["optimizer"])
            levels, history, resumed = state["levels"], state["history"], state["step"]
            log(f"distill: resuming at step {resumed} from {checkpoint.name}")
        before = dl.held_out(graph, params, teacher, held, t_of(), is_lm)
        order = visit_order(len(train_feeds), c.steps * c.batch, c.seed)
        first = np.asarray(next(iter(train_feeds[0].values())))
        tokens_per_window = int(first.size if is_lm else first.shape[0])   # token ids, or rows of a float input
        ts, training = t_of(), time.perf_counter()
        threshold = dl.student_threshold(ts, c.gradient == "straight")
        progress = bar(total=c.steps, desc="distill", unit="step")
        progress.update(resumed)
        every = max(1, c.steps // 10)
        for step in range(resumed, c.steps):
            batch = [train_feeds[i] for i in order[step * c.batch:(step + 1) * c.batch]]
            if c.recalibrate_every and step % c.recalibrate_every == 0 and step > 0:
                levels |= dl.recalibrated(graph, params, batch[:c.recalibrate_windows], trained, sparsity,
                                          ts, scales)
                ts.update(t_of())
            lr = dl.learning_rate(step, c.steps, c.lr, c.warmup, c.lr_floor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with devices.autocast(self.device, c.bf16):
                with torch.no_grad():
                    target_out = graph.run_batch(batch, _open, teacher)[0]
                out = graph.run_batch(batch, threshold, params)[0]
            if is_lm:
                ids = torch.stack([torch.as_tensor(np.asarray(f["input_ids"])) for f in batch]).to(self.device)
                kl, ce = dl.lm_losses(out, target_out, ids, c.temperature)
                loss = kl + c.ce_weight * ce
                row = {"step": step + 1, "loss": loss.item(), "kl": kl.item(), "ce": ce.item(), "lr": lr}
            else:
                loss = ((out.float() - target_out.float()) ** 2).mean()
                row = {"step": step + 1, "loss": loss.item(), "lr": lr}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            history.append(row)
            progress.update(1)
            done = step + 1 - resumed
            if done % every == 0 or step + 1 == c.steps:
                rate = done * c.batch * tokens_per_window / (time.perf_counter() - training)
                eta = (c.steps - step - 1) * (time.perf_counter() - training) / done
                log(f"distill: step {step + 1}/{c.steps}, loss {row['loss']:.4f}, {rate:,.0f} tokens/s, "
                    f"ETA {eta:.0f} s")
            if checkpoint is not None and ((step + 1) % c.checkpoint_every == 0 or step + 1 == c.steps):
                _atomic_torch_save(checkpoint, {"params": {k: v.detach().cpu() for k, v in params.items()},
                                                "optimizer": optimizer.state_dict(), "levels": levels,
                                                "history": history, "step": step + 1})
        progress.close()
        training = time.perf_counter() - training
        after = dl.held_out(graph, params, teacher, held, t_of(), is_lm)
        return self._finish(params, levels, thresholds, natural, hists, target, sparsity, entry, trained, {
            "before": before, "after": after, "history": history, "resumed": resumed, "names": names,
            "training_seconds": training, "started": started, "tokens_per_window": tokens_per_window,
            "windows": len(train_feeds), "held_out": len(held)})

    def _data(self, graph, teacher, is_lm, sample_windows) -> tuple[list[dict], list[dict]]:
        """Training and held-out feeds: the calibration data's windows (and the samples)."""
        c = self.c
        source = self.ctx.calibration.with_windows(c.text_windows or None)
        feeds = list(source.feeds(graph.inputs))
        if len(feeds) <= c.held_out:
            raise SparseccError(f"distill: the calibration data has {len(feeds)} window(s), not more than held_out "
                                f"({c.held_out}); give more data or lower held_out")
        held = feeds[len(feeds) - c.held_out:] if c.held_out else []
        train = feeds[:len(feeds) - c.held_out]
        if c.samples:
            if not is_lm:
                raise SparseccError("distill: samples need a language model (an input_ids input); set samples=0")
            from sparsecc.data import feeds_for_ids

            first = np.array([int(np.asarray(f["input_ids"]).reshape(-1)[0]) for f in train])
            seq_len = int(np.asarray(train[0]["input_ids"]).shape[-1])
            rows = self._samples(graph, teacher, np.resize(first, c.samples), seq_len, sample_windows)
            train += [feeds_for_ids(row, graph.inputs) for row in rows]
        shapes = {tuple(np.asarray(v).shape for v in f.values()) for f in train}
        if len(shapes) > 1:
            raise SparseccError("distill: the training windows differ in shape; give windows of one length")
        return train, held

    def _samples(self, graph, teacher, first, seq_len, sample_windows) -> np.ndarray:
        """The teacher's own windows, cached by the teacher's weights and the options."""
        c = self.c
        digest = hashlib.sha256(json.dumps([c.samples, c.sample_temperature, c.seed, seq_len, self.device.type,
                                            first.tolist()]).encode())
        for name in sorted(teacher):
            digest.update(teacher[name].detach().cpu().numpy().tobytes())
        path = Path(self.ctx.cache_dir) / f"distill-samples-{digest.hexdigest()[:32]}.npy" if self.ctx.cache_dir else None
        if path is not None and path.is_file():
            return np.load(path)
        rows = sample_windows(_TeacherView(graph, teacher), first, seq_len, c.seed, c.sample_temperature,
                              batch=c.sample_batch, bf16=c.bf16, desc="distill: sampling")
        if path is not None:
            from sparsecc.sampling import _atomic_save
            _atomic_save(path, rows)
        return rows

    def _checkpoint_path(self, model, names, train_feeds) -> Path | None:
        if self.ctx.cache_dir is None:
            return None
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self.c) | {"device": self.device.type},
                                           sort_keys=True).encode())
        for name in names:
            digest.update(name.encode())
            digest.update(model.graph.initializers[name].const_value.tobytes())
        for node in model.graph:
            if ops.is_threshold(node):
                digest.update(node.inputs[1].const_value.tobytes())
        for feed in train_feeds:
            for key in sorted(feed):
                digest.update(np.ascontiguousarray(feed[key]).tobytes())
        return Path(self.ctx.cache_dir) / f"distill-{digest.hexdigest()[:32]}.pt"

    def _finish(self, params, levels, thresholds, natural, hists, target, sparsity, entry, trained, run) -> dict:
        model, c = self.model, self.c
        for name, value in params.items():   # the trained values, in each initializer's own dtype
            initializer = model.graph.initializers[name]
            array = value.detach().cpu().numpy().astype(initializer.dtype.numpy())
            initializer.const_value = ir.tensor(array, name=name)
        for th in thresholds:
            ops.set_threshold(th.node, levels[th.node.name])
        statistics = [th.source for th in thresholds] + [s.consumes for s in natural]
        hists_now = collect(model, statistics, self.ctx.calibration, self.ctx.cache_dir, desc="distill: re-measuring")
        index = {th.node.name for th in trained}
        factor = common_factor(lambda f: threshold_sparsity(thresholds, natural, hists_now,
                                                            scaled_levels(levels, index, f)), target)
        final = scaled_levels(levels, index, factor)
        for th in thresholds:
            ops.set_threshold(th.node, final[th.node.name])
        seconds = time.perf_counter() - run["started"]
        done = c.steps - run["resumed"]
        tokens = done * c.batch * run["tokens_per_window"]
        history = run["history"]
        keep = np.unique(np.linspace(0, len(history) - 1, min(len(history), MAX_HISTORY)).round().astype(int))
        after, before = run["after"], run["before"]
        if after.get("ppl_student") is not None:
            log(f"distill: held-out perplexity {before['ppl_student']:.2f} -> {after['ppl_student']:.2f} "
                f"(teacher {after['ppl_teacher']:.2f}) at model-wide sparsity {target:.2%}; "
                f"{tokens:,} tokens in {run['training_seconds']:.0f} s on {self.device.type}")
        rows = [{"threshold": th.node.name, "t_before": entry[th.node.name], "t_after": ops.threshold_level(th.node),
                 "sparsity_before": round(sparsity[th.node.name], 6),
                 "sparsity_after": round(hists_now[th.source].sparsity_at(final[th.node.name]), 6)}
                for th in thresholds]
        return PassResult({
            "target": round(target, 6),
            "calibrated_model_sparsity": round(threshold_sparsity(thresholds, natural, hists_now, final), 6),
            "common_factor": factor,
            "held_out": {"before": before, "after": after},
            "training": {"steps": c.steps, "resumed_at": run["resumed"], "tokens": tokens,
                         "windows": run["windows"], "held_out_windows": run["held_out"],
                         "trained_tensors": len(run["names"]),
                         "trained_parameters": int(sum(params[n].numel() for n in run["names"])),
                         "device": self.device.type, "bf16": c.bf16,
                         "seconds": round(seconds, 3), "training_seconds": round(run["training_seconds"], 3),
                         "tokens_per_second": round(tokens / run["training_seconds"], 1) if done else None},
            "history": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in history[i].items()} for i in keep],
            "thresholds": rows,
        })


def _open(node, x, t):
    return x


class _TeacherView:
    """The graph as the teacher: its entry weights given as the trainable tensors' values."""

    def __init__(self, graph, teacher):
        self.graph, self.teacher = graph, teacher
        self.device, self.inputs = graph.device, graph.inputs

    def run_batch(self, feeds, threshold):
        return self.graph.run_batch(feeds, threshold, self.teacher)


def _atomic_torch_save(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
