"""PyTorch wrappers that run a causal LM one token at a time with its state explicit:
`forward(input_ids [1, 1], *state) -> (logits [1, 1, vocab], *new_state)`.

They use the `transformers` model's own modules and parameters; only the state plumbing is
theirs (the library keeps recurrent state in mutable cache objects, which an exported graph
cannot). Each is checked against the library model run on the whole sequence
(tests/test_step_graphs.py). `step_module(model)` picks the wrapper for a model.

- RWKV-4: per layer the time-mix shift, the WKV numerator, denominator and running max, and
  the channel-mix shift. The WKV update is `rwkv_linear_attention_cpu` for one token. The
  linear layers are called in the RWKV/SENECA paper's site order (time-mix key, receptance,
  value, output; channel-mix receptance, key, value), so that graph order is that order and
  the sequential search visits the thresholds as the paper does.
- Mamba: per layer the last `conv_kernel - 1` inputs of the causal convolution and the SSM
  state. dt_proj is applied as x @ W^T (the library writes W @ x^T, the same product), so
  that it is a linear site like the others.
- xLSTM (mLSTM blocks): per layer the matrix memory C, normalizer n and max m, through the
  library's own block and its native step kernel.
- Attention decode (any model with a `DynamicCache`): per layer the key and value cache
  [1, kv_heads, past, head_dim]; `new_state` is one longer. The position is the cache's length.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsecc.errors import SparseccError
from sparsecc.stepgraph import StateSpec, StepSpec


def _mix(x: torch.Tensor, shifted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * weight + shifted * (1 - weight)   # as RwkvSelfAttention/RwkvFeedForward write it


class RwkvStep(nn.Module):
    arch = "rwkv"
    per_layer = ("time-mix shift", "wkv numerator", "wkv denominator", "wkv max", "channel-mix shift")

    def __init__(self, lm):
        super().__init__()
        self.lm = lm.eval()
        self.lm.rwkv._rescale_layers()   # what the library does on its first eval forward
        cfg = lm.config
        att = cfg.attention_hidden_size or cfg.hidden_size
        sizes = (cfg.hidden_size, att, att, att, cfg.hidden_size)
        # the running max starts at -1e38, as rwkv_linear_attention_cpu starts it
        self.spec = StepSpec(self.arch, tuple(
            StateSpec(f"layer {i} {role}", (1, size), -1e38 if role == "wkv max" else 0.0)
            for i in range(cfg.num_hidden_layers) for role, size in zip(self.per_layer, sizes)))

    def forward(self, input_ids, *state):
        model, cfg = self.lm.rwkv, self.lm.config
        hidden = model.embeddings(input_ids)            # [1, 1, D]
        new_state = []
        for i, block in enumerate(model.blocks):
            att_x, num, den, mx, ffn_x = state[5 * i:5 * i + 5]
            if i == 0:
                hidden = block.pre_ln(hidden)
            att = block.attention
            x = block.ln1(hidden)
            key = att.key(_mix(x, att_x[:, None], att.time_mix_key))[:, 0].float()
            receptance = torch.sigmoid(att.receptance(_mix(x, att_x[:, None], att.time_mix_receptance)))
            value = att.value(_mix(x, att_x[:, None], att.time_mix_value))[:, 0]
            # rwkv_linear_attention_cpu, one token
            first, decay = att.time_first, -torch.exp(att.time_decay)
            out_max = torch.maximum(mx, key + first)
            e1, e2 = torch.exp(mx - out_max), torch.exp(key + first - out_max)
            wkv = (e1 * num + e2 * value) / (e1 * den + e2)
            state_max = torch.maximum(mx + decay, key)
            e1, e2 = torch.exp(mx + decay - state_max), torch.exp(key - state_max)
            num, den = e1 * num + e2 * value, e1 * den + e2
            hidden = hidden + att.output(receptance * wkv[:, None].to(receptance.dtype))
            ff = block.feed_forward
            x2 = block.ln2(hidden)
            receptance = torch.sigmoid(ff.receptance(_mix(x2, ffn_x[:, None], ff.time_mix_receptance)))
            key = torch.square(torch.relu(ff.key(_mix(x2, ffn_x[:, None], ff.time_mix_key))))
            hidden = hidden + receptance * ff.value(key)
            if model.layers_are_rescaled and cfg.rescale_every > 0 and (i + 1) % cfg.rescale_every == 0:
                hidden = hidden / 2
            new_state += [x[:, 0], num, den, state_max, x2[:, 0]]
        return (self.lm.head(model.ln_out(hidden)), *new_state)


class MambaStep(nn.Module):
    arch = "mamba"

    def __init__(self, lm):
        super().__init__()
        self.lm = lm.eval()
        cfg = lm.config
        if cfg.hidden_act not in ("silu", "swish"):
            raise SparseccError(f"Mamba step export supports hidden_act silu, not {cfg.hidden_act!r}")
        self.spec = StepSpec(self.arch, tuple(
            spec for i in range(cfg.num_hidden_layers) for spec in (
                StateSpec(f"layer {i} conv window", (1, cfg.intermediate_size, cfg.conv_kernel - 1)),
                StateSpec(f"layer {i} ssm state", (1, cfg.intermediate_size, cfg.state_size)))))

    def forward(self, input_ids, *state):
        model = self.lm.backbone
        hidden = model.embeddings(input_ids)            # [1, 1, D]
        new_state = []
        for i, layer in enumerate(model.layers):
            conv, ssm = state[2 * i:2 * i + 2]
            residual = hidden.float() if layer.residual_in_fp32 else hidden
            mixer = layer.mixer
            x, gate = mixer.in_proj(layer.norm(hidden))[:, 0].chunk(2, dim=-1)     # [1, I] each
            window = torch.cat([conv, x[:, :, None]], dim=-1)                    # [1, I, K]
            x = (window * mixer.conv1d.weight[:, 0, :]).sum(-1)
            if mixer.conv1d.bias is not None:
                x = x + mixer.conv1d.bias
            x = mixer.act(x)
            dt, b, c = torch.split(mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size,
                                                     mixer.ssm_state_size], dim=-1)
            dt = nn.functional.softplus(mixer.dt_proj(dt))                       # [1, I]
            a = -torch.exp(mixer.A_log.float())
            # mamba_selective_state_update, one token
            ssm = ssm * torch.exp(dt[..., None] * a) + (dt[..., None] * b[:, None, :]) * x[..., None]
            y = torch.matmul(ssm, c[..., None])[..., 0] + x * mixer.D
            y = y * nn.functional.silu(gate)
            hidden = residual + mixer.out_proj(y[:, None])
            new_state += [window[:, :, 1:], ssm]
        return (self.lm.lm_head(model.norm_f(hidden)).float(), *new_state)


class XlstmStep(nn.Module):
    arch = "xlstm"

    def __init__(self, lm):
        super().__init__()
        self.lm = lm.eval()
        cfg = lm.config
        if cfg.mode != "inference":   # only the inference backend has the one-token step kernel
            cfg.mode = "inference"
        if cfg.inference_state_dtype != "float32":
            raise SparseccError(f"xLSTM step export needs inference_state_dtype float32, not {cfg.inference_state_dtype!r}")
        layer = lm.backbone.blocks[0].mlstm_layer   # its sizes (the config's qk_head_dim rounds up to 64)
        h, dqk, dv = cfg.num_heads, layer.qk_dim // cfg.num_heads, layer.v_dim // cfg.num_heads
        self.spec = StepSpec(self.arch, tuple(
            spec for i in range(cfg.num_hidden_layers) for spec in (
                StateSpec(f"layer {i} mLSTM memory C", (1, h, dqk, dv)),
                StateSpec(f"layer {i} mLSTM normalizer n", (1, h, dqk)),
                StateSpec(f"layer {i} mLSTM max m", (1, h, 1)))))

    def forward(self, input_ids, *state):
        from transformers.models.xlstm.modeling_xlstm import soft_cap

        model = self.lm.backbone
        hidden = model.embeddings(input_ids)
        new_state = []
        for i, block in enumerate(model.blocks):
            hidden, layer_state = block(hidden, state=tuple(state[3 * i:3 * i + 3]))
            new_state += list(layer_state)
        logits = self.lm.lm_head(model.out_norm(hidden).to(self.lm.lm_head.weight.dtype)).float()
        return (soft_cap(logits, self.lm.config.output_logit_soft_cap), *new_state)


class KvCacheDecodeStep(nn.Module):
    """Any transformers causal LM that keeps its attention cache in a `DynamicCache` (Llama,
    Qwen, Gemma, Phi-3, Mistral, GPT-2, OPT, GPT-NeoX, ...): the model's own forward on one
    token with the cache rebuilt from the state. Each state's shape is read from the cache the
    model itself returns for one token, so no per-architecture sizes are needed. A sliding-window
    layer keeps its whole cache here (its mask still limits what it attends to)."""

    def __init__(self, lm):
        super().__init__()
        from transformers.cache_utils import DynamicCache

        self.lm = lm.eval()
        with torch.no_grad():
            cache = lm(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True).past_key_values
        if not isinstance(cache, DynamicCache) or not getattr(cache, "layers", None):
            raise SparseccError(f"{type(lm).__name__} returns no DynamicCache of keys and values, so its decode step "
                                "cannot carry one; export it with --graph window")
        self.arch = lm.config.model_type
        states = []
        for i, layer in enumerate(cache.layers):
            for kind, tensor in (("key", layer.keys), ("value", layer.values)):
                if tensor is None or tensor.dim() != 4 or tensor.shape[2] != 1:
                    raise SparseccError(f"{type(lm).__name__} layer {i} caches its {kind}s as "
                                        f"{None if tensor is None else list(tensor.shape)}, not [batch, heads, "
                                        "positions, head_dim]; export it with --graph window")
                states.append(StateSpec(f"layer {i} {kind} cache", (1, tensor.shape[1], "past", tensor.shape[3]), 0.0, 2))
        self.spec = StepSpec(self.arch, tuple(states))

    def forward(self, input_ids, *state):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache([(state[2 * i], state[2 * i + 1]) for i in range(len(state) // 2)])
        out = self.lm(input_ids=input_ids, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


# recurrent models, whose state the library keeps in objects of its own
RECURRENT = {"RwkvForCausalLM": RwkvStep, "MambaForCausalLM": MambaStep, "xLSTMForCausalLM": XlstmStep}


def step_module(lm) -> nn.Module:
    """The step wrapper for a transformers causal LM: its recurrent wrapper, else the KV-cache
    decode step (SparseccError, naming --graph window, when the model has no such cache)."""
    return RECURRENT.get(type(lm).__name__, KvCacheDecodeStep)(lm)
