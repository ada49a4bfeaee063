"""Train the bundled sample: a 1M-parameter Llama-architecture model on WikiText-2 valid.

    python samples/tiny_llama/train.py      # ~5 minutes on 2 CPU cores

Writes `samples/tiny_llama/{model.onnx,tokenizer.json}`: a byte-level BPE tokenizer
(2048 tokens, `<s>` as BOS) trained on the same text, and the model exported with
`torch.onnx.export(dynamo=True)` as `input_ids -> logits`. The architecture is SmolLM2's
in miniature (RMSNorm, RoPE, grouped-query attention, SiLU-gated MLP), so every pass
sees the graph shapes of the real model. Seeded: a rerun gives the same weights.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"
BOS = "<s>"


def train_tokenizer(text_path: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text_path)], trainer)
    # Like SmolLM2's, the tokenizer marks its BOS; sparsecc starts each window with it.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)

    tok = train_tokenizer(args.data, 2048)
    ids = np.array(tok.encode(args.data.read_text(encoding="utf-8"), add_special_tokens=False).ids, dtype=np.int64)
    bos = tok.token_to_id(BOS)
    print(f"{len(ids)} training tokens")

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=bos,
                      eos_token_id=bos, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    seq, batch = 128, 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    start, step = time.time(), 0
    budget = args.minutes * 60
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        for g in opt.param_groups:  # linear warm-up, cosine decay over the time budget
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        starts = rng.integers(0, len(ids) - seq, size=batch)
        x = torch.from_numpy(np.stack([np.concatenate([[bos], ids[s:s + seq - 1]]) for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
        step += 1
    model.eval()
    model.config.use_cache = False

    class LogitsOnly(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    example = torch.from_numpy(np.concatenate([[bos], ids[:15]]))[None]
    program = torch.onnx.export(LogitsOnly(model), (example,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], opset_version=18,
                                dynamic_shapes={"input_ids": {1: torch.export.Dim("seq", min=2, max=512)}})
    program.save(str(args.out / "model.onnx"), external_data=False)
    tok.save(str(args.out / "tokenizer.json"))
    print(f"wrote {args.out / 'model.onnx'} after {step} steps, final loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
