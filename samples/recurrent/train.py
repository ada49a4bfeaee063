"""Train small RWKV-4, Mamba and xLSTM language models on WikiText-2 valid and export their
step graphs: models whose activations have real structure, since no pretrained weights can
be downloaded here.

    pip install -e ".[export]"
    nice -n 10 python samples/recurrent/train.py                 # all three, ~15 min each on 2 cores
    nice -n 10 python samples/recurrent/train.py --arch rwkv     # one

For each architecture, into `build/recurrent/<arch>/`: the trained model (transformers
`save_pretrained`, with the bundled sample's 2048-token tokenizer), `step/` (the step graph
written by `sparsecc export`, checked against PyTorch) and `train.json` (steps, final training
loss, seconds, perplexity on 64 windows of 256 tokens of WikiText-2 test). Fixed step counts,
not a time budget, so a rerun gives the same weights: seeded, deterministic algorithms, 2
threads. The step counts were chosen to fit 15 minutes on 2 free cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
TOKENIZER = REPO / "samples" / "tiny_llama" / "tokenizer.json"
OUT = REPO / "build" / "recurrent"
SEQ, BATCH = 128, 16


def make_model(arch: str, vocab: int, bos: int):
    """A 4-layer, width-256 model of each architecture (2.2M to 4.5M parameters)."""
    from transformers import (MambaConfig, MambaForCausalLM, RwkvConfig, RwkvForCausalLM, xLSTMConfig,
                              xLSTMForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, bos_token_id=bos, eos_token_id=bos,
                  pad_token_id=bos)
    if arch == "rwkv":
        return RwkvForCausalLM(RwkvConfig(**common, attention_hidden_size=256, intermediate_size=1024,
                                          context_length=SEQ, rescale_every=0))
    if arch == "mamba":
        # state_size 8 (not 16): the scan's cost on CPU is proportional to it
        return MambaForCausalLM(MambaConfig(**common, state_size=8, expand=2, conv_kernel=4, time_step_rank=16))
    if arch == "xlstm":
        # float32 kernels (the default autocasts the chunkwise kernel to bfloat16); trained with
        # the chunkwise kernel, switched to "inference" (which has the one-token step) after
        return xLSTMForCausalLM(xLSTMConfig(**common, num_heads=4, mode="train", chunk_size=64,
                                            autocast_kernel_dtype="float32", ffn_round_up_to_multiple_of=64,
                                            tie_word_embeddings=False))
    raise SystemExit(f"unknown arch {arch!r}; choose rwkv, mamba or xlstm")


def _rwkv_wkv(time_decay, time_first, key, value, state=None, return_state=False):
    """`rwkv_linear_attention_cpu` for training from a zero state: the same recurrence, with
    the sequence taken apart once (unbind) instead of indexed and written per token, whose
    backward fills a sequence-sized tensor at every step."""
    if state is not None or return_state:
        return _LIBRARY["rwkv"](time_decay, time_first, key, value, state, return_state)
    num = torch.zeros_like(key[:, 0], dtype=torch.float32)
    den = torch.zeros_like(num)
    mx = num - 1e38
    decay, out = -torch.exp(time_decay), []
    for k, v in zip(key.float().unbind(1), value.unbind(1)):
        top = torch.maximum(mx, k + time_first)
        e1, e2 = torch.exp(mx - top), torch.exp(k + time_first - top)
        out.append((e1 * num + e2 * v) / (e1 * den + e2))
        top = torch.maximum(mx + decay, k)
        e1, e2 = torch.exp(mx + decay - top), torch.exp(k - top)
        num, den, mx = e1 * num + e2 * v, e1 * den + e2, top
    return torch.stack(out, 1).to(key.dtype), None


def _mamba_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False, **kwargs):
    """`mamba_selective_scan` (its recurrent branch) for training, likewise taken apart once:
    the library's branch materialises [batch, channels, length, state] tensors and indexes
    them per token, about 100 s a step here."""
    if return_last_state:
        return _LIBRARY["mamba"](hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, **kwargs)
    if delta_bias is not None:
        dt = dt + delta_bias[..., None]
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    state = hidden_states.new_zeros(hidden_states.shape[0], hidden_states.shape[1], A.shape[-1])
    out = []
    for x_t, dt_t, b_t, c_t in zip(hidden_states.unbind(2), dt.unbind(2), B.unbind(2), C.unbind(2)):
        state = torch.exp(A * dt_t[..., None]) * state + (dt_t[..., None] * b_t[:, None, :]) * x_t[..., None]
        out.append(torch.matmul(state, c_t[..., None])[..., 0])
    y = torch.stack(out, -1)
    if D is not None:
        y = y + hidden_states * D[None, :, None]
    return y * torch.nn.functional.silu(z) if z is not None else y


_LIBRARY: dict = {}


@contextlib.contextmanager
def training_kernels():
    """Swap in the training scans above for the library's while training; each is first
    checked to equal the library's own on random inputs."""
    from transformers.models.mamba import modeling_mamba
    from transformers.models.rwkv import modeling_rwkv

    _LIBRARY.update(rwkv=modeling_rwkv.rwkv_linear_attention_cpu, mamba=modeling_mamba.mamba_selective_scan)
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(n, generator=g) for n in (8,)] + [torch.randn(8, generator=g)] + [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    if not torch.allclose(_rwkv_wkv(*args)[0], _LIBRARY["rwkv"](*args)[0], atol=1e-5):
        raise RuntimeError("the training WKV differs from transformers' rwkv_linear_attention_cpu")
    args = [torch.randn(2, 8, 5, generator=g), torch.randn(2, 8, 5, generator=g), -torch.rand(8, 4, generator=g),
            torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g), torch.randn(8, generator=g),
            torch.randn(2, 8, 5, generator=g), torch.randn(8, generator=g), True]
    if not torch.allclose(_mamba_scan(*args), _LIBRARY["mamba"](*args), atol=1e-5):
        raise RuntimeError("the training scan differs from transformers' mamba_selective_scan")
    modeling_rwkv.rwkv_linear_attention_cpu, modeling_mamba.mamba_selective_scan = _rwkv_wkv, _mamba_scan
    try:
        yield
    finally:
        modeling_rwkv.rwkv_linear_attention_cpu, modeling_mamba.mamba_selective_scan = _LIBRARY["rwkv"], _LIBRARY["mamba"]


# steps x 16 windows of 128 tokens; chosen to fit 15 minutes on 2 free cores
STEPS = {"rwkv": 600, "mamba": 600, "xlstm": 350}
LR = {"rwkv": 2e-3, "mamba": 5e-3, "xlstm": 5e-3}
WARMUP = 20


def train(arch: str, ids: np.ndarray, bos: int, vocab: int, steps: int, lr: float) -> tuple:
    torch.manual_seed(0)
    model = make_model(arch, vocab, bos)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(0)
    start, cpu, losses = time.time(), time.process_time(), []
    for step in range(steps):
        for g in opt.param_groups:  # linear warm-up, cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        starts = rng.integers(0, len(ids) - SEQ, size=BATCH)
        x = torch.from_numpy(np.stack([np.concatenate([[bos], ids[s:s + SEQ - 1]]) for s in starts]))
        loss = model(input_ids=x, labels=x, use_cache=False).loss   # a cache would be written in place
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"{arch} step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    if arch == "xlstm":
        model.config.mode = "inference"
    return model.eval(), float(np.mean(losses[-20:])), time.time() - start, time.process_time() - cpu


def test_perplexity(model, windows: np.ndarray) -> float:
    from sparsecc.metrics import Perplexity

    ppl = Perplexity()
    with torch.no_grad():
        for row in windows:
            ppl.add(model(input_ids=torch.from_numpy(row)[None], use_cache=False).logits[0].numpy(), row)
    return ppl.value


def main(argv=None) -> None:
    from sparsecc.data import TextWindows, Tokenizer
    from sparsecc.export import export

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["rwkv", "mamba", "xlstm"], choices=sorted(STEPS))
    ap.add_argument("--steps", type=int, help="override the step count (for a quick try)")
    ap.add_argument("--lr", type=float, help="override the peak learning rate")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    tok = Tokenizer(TOKENIZER)
    ids = tok.encode((DATA / "valid.txt").read_text(encoding="utf-8"))
    vocab = 2048
    test = TextWindows(DATA / "test.txt", tok, seq_len=256, limit=64).rows
    for arch in args.arch:
        steps = args.steps or STEPS[arch]
        with training_kernels():
            model, loss, seconds, cpu = train(arch, ids, tok.bos_id, vocab, steps, args.lr or LR[arch])
        folder = args.out / arch
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        shutil.copy(TOKENIZER, folder / "tokenizer.json")
        ppl = test_perplexity(model, test)
        report = export(folder, folder / "step", check_tokens=64, text=DATA / "test.txt")
        summary = {"arch": arch, "parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
                   "batch": BATCH, "seq_len": SEQ, "lr": args.lr or LR[arch], "final_train_loss": round(loss, 4),
                   "train_seconds": round(seconds), "train_cpu_seconds": round(cpu), "test_perplexity": round(ppl, 3), "test_windows": len(test),
                   "step_graph_check": report["check"]}
        (folder / "train.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
