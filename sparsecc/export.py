"""`sparsecc export`: a transformers causal LM as an ONNX graph of one of two forms:

- `window`: `input_ids` [1, T] -> `logits` [1, T, vocab], T dynamic (what compile, eval and
  simulate take for any model);
- `step`: one token and the state in, logits and the next state out (see `sparsecc.stepgraph`
  for its interface and metadata, `sparsecc.step_models` for the wrappers): the recurrent
  state of RWKV-4, Mamba and xLSTM, the key/value cache of any attention model.

Exported with `torch.onnx.export(dynamo=True)`, opset 18. The output folder holds
`model.onnx`, the tokenizer when the source has one, and `report.json`: the graph's form (a
step graph's states and their bytes) and the check that ONNX Runtime's logits equal the
PyTorch model's run on the whole sequence, over `check_tokens` tokens (a step graph fed them
one at a time). What cannot be exported (not a causal LM, an architecture the exporter cannot
trace) is refused in one line with the closest thing that works.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from sparsecc.errors import SparseccError
from sparsecc.model_io import atomic_dir, check_output_dir, save_model
from sparsecc.progress import log
from sparsecc.stepgraph import LOGITS, METADATA_KEY, TOKEN, state_input, state_output

# |ONNX Runtime - PyTorch| allowed on logits, relative to the logits' largest magnitude:
# float32 with a different summation order, carried through the state over the check.
CHECK_RTOL = 1e-4
MAX_PAST = 4096  # the longest KV cache a decode graph accepts, and the longest window a window graph takes
GRAPHS = ("window", "step")


def _torch():
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        raise SparseccError("export needs torch and transformers: pip install -e \".[export]\"") from None
    return torch


def load_causal_lm(source: str | Path):
    """(model in float32, eval mode; a function that writes its tokenizer into a folder, or
    None) from a transformers folder (config.json + weights) or a .gguf file (dequantized,
    as samples/smollm2/build.py loads SmolLM2)."""
    _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        with _unreadable(source):
            lm = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        return lm.eval(), lambda folder: tokenizer.save_pretrained(str(folder))
    if not (source / "config.json").is_file():
        raise SparseccError(f"{source} is neither a transformers model folder (with config.json) nor a .gguf file")
    with _unreadable(source):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source))
    check_causal_lm(config, source)
    with _unreadable(source):
        lm = AutoModelForCausalLM.from_pretrained(str(source), dtype="float32")
    if not (source / "tokenizer.json").is_file():
        return lm.eval(), None
    return lm.eval(), lambda folder: shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")


def check_causal_lm(config, source) -> None:
    """SparseccError unless `config` is a decoder-only causal LM: an encoder-decoder (T5, BART)
    or an encoder (BERT: transformers would load it as a causal LM, but it was not trained as
    one) is refused with what to do instead."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise SparseccError(f"{source} is an encoder-decoder (seq2seq) model ({kind}); sparsecc exports decoder-only "
                            "causal LMs: export a decoder-only model (e.g. Llama, Qwen2, GPT-2), or export this one "
                            "to ONNX yourself and compile that graph")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise SparseccError(f"{source} is an encoder-only (masked LM) model ({kind}), not a causal LM; export it to ONNX "
                            "yourself (e.g. torch.onnx.export) and compile that graph, or export a decoder-only model")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SparseccError(f"{source} ({kind}) has no causal-LM head in transformers; sparsecc exports models that "
                            "AutoModelForCausalLM loads (e.g. Llama, Qwen2, Gemma, Phi-3, GPT-2, Mamba); export this one "
                            "to ONNX yourself and compile that graph")


@contextlib.contextmanager
def _hushed():
    """With -q / --json, torch's and transformers' own warnings, logs and progress bars off
    for the duration, so that stderr stays empty; restored afterwards."""
    from sparsecc import progress

    if not progress.quiet():
        yield
        return
    import logging
    import warnings

    _torch()   # imported first: importing torch sets its loggers' levels
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("torch", "torch.onnx", "transformers")]
    levels = [logger.level for logger in loggers]
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _unreadable(source: Path):
    """transformers' loading errors (bad config.json, missing weights, not GGUF, unknown
    model type) as one line: they come as OSError, ValueError, KeyError and others."""
    try:
        yield
    except SparseccError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparseccError(f"cannot load {source} as a causal LM ({first}); pass a transformers folder "
                            "(config.json + weights) or a .gguf file") from None


def _window_module(lm):
    torch = _torch()

    class Window(torch.nn.Module):
        """input_ids [1, T] -> logits [1, T, vocab], no cache."""

        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Window().eval()


def _onnx_export(module, args, graph: str, lm, **kwargs):
    """torch.onnx.export(dynamo=True) with its failures as one line naming the closest thing that works."""
    torch = _torch()
    try:
        with torch.no_grad():
            return torch.onnx.export(module, args, dynamo=True, opset_version=18, verbose=False, **kwargs).model
    except SparseccError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        other = {"window": "--graph step", "step": "--graph window"}[graph]
        raise SparseccError(f"torch.onnx.export cannot export {type(lm).__name__} as a {graph} graph ({type(exc).__name__}: "
                            f"{first}); try {other}, or a transformers version whose modeling code exports") from None


def export_window_graph(lm, path: Path) -> None:
    """Export `lm` as a window graph (input_ids [1, T] -> logits, T from 2 to MAX_PAST) to `path`."""
    torch = _torch()
    vocab = lm.config.vocab_size
    example = (torch.arange(16, dtype=torch.int64)[None] * 7 + 1) % vocab   # any tokens: only shapes are traced
    seq = torch.export.Dim("seq", min=2, max=MAX_PAST)
    model = _onnx_export(_window_module(lm), (example,), "window", lm, input_names=[TOKEN], output_names=[LOGITS],
                         dynamic_shapes={"input_ids": {1: seq}})
    if isinstance(model.graph.inputs[0].shape[1], int):   # the exporter fixed it: a Python loop over positions
        raise SparseccError(f"torch.onnx.export fixes the window length of {type(lm).__name__} at "
                            f"{model.graph.inputs[0].shape[1]} tokens (its forward loops over positions); "
                            "export it with --graph step")
    model.producer_name = "sparsecc export"
    save_model(model, path)


def export_step_graph(lm, path: Path):
    """Export the step wrapper of `lm` to `path` (ONNX, metadata included); return the wrapper."""
    torch = _torch()
    from sparsecc.step_models import step_module

    wrapper = step_module(lm).eval()
    spec = wrapper.spec
    past = torch.export.Dim("past", min=0, max=MAX_PAST)
    example = [torch.from_numpy(a) for a in spec.initial_state().values()]
    # a non-empty cache in the example so the exporter does not specialise on its length
    example = [t.new_zeros([3 if d == "past" else d for d in s.shape]) if s.grow_axis is not None else t
               for t, s in zip(example, spec.states)]
    dynamic = [{s.grow_axis: past} if s.grow_axis is not None else None for s in spec.states]
    token = torch.zeros(1, 1, dtype=torch.int64)
    model = _onnx_export(wrapper, (token, *example), "step", lm,
                         input_names=[TOKEN] + [state_input(i) for i in range(len(example))],
                         output_names=[LOGITS] + [state_output(i) for i in range(len(example))],
                         dynamic_shapes=(None, tuple(dynamic)) if any(dynamic) else None)
    model.metadata_props[METADATA_KEY] = spec.to_json()
    model.producer_name = "sparsecc export"
    save_model(model, path)
    return wrapper


def check_parity(lm, path: Path, tokens: list[int]) -> dict:
    """ONNX Runtime on the graph (a step graph fed one token at a time) against the PyTorch
    model on the whole sequence: max |diff| of the logits."""
    torch = _torch()
    from sparsecc.runtime import load_session
    from sparsecc.stepgraph import StepSession

    session = load_session(path)
    if isinstance(session, StepSession):
        onnx_logits = session.logits(tokens)
    else:
        onnx_logits = session.run([LOGITS], {TOKEN: np.array([tokens], dtype=np.int64)})[0][0]
    with torch.no_grad():
        reference = lm(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float().numpy()
    diff = float(np.abs(onnx_logits - reference).max())
    scale = float(np.abs(reference).max())
    return {"tokens": len(tokens), "max_abs_diff": diff, "max_abs_logit": scale,
            "tolerance": CHECK_RTOL * scale, "ok": diff <= CHECK_RTOL * scale}


def check_tokens_from_text(source: str | Path, text: str | Path, count: int) -> list[int]:
    """The first window of `count` tokens of `text`, cut as sparsecc cuts evaluation windows
    (led by BOS when the tokenizer adds one), with the model's tokenizer."""
    from sparsecc.data import TextWindows, Tokenizer

    source = Path(source)
    if source.suffix != ".gguf" and not (source / "tokenizer.json").is_file():
        raise SparseccError(f"--check-text needs the model's tokenizer.json in {source}")
    return TextWindows(text, Tokenizer(source), seq_len=count).rows[0].tolist()


def export(source: str | Path, out: str | Path, graph: str = "step", check_tokens: int = 16, seed: int = 0,
           text: str | Path | None = None) -> dict:
    """Export the model at `source` as a `graph` ("window" or "step") into the folder `out`
    (replaced atomically); return the report. The check runs on the first `check_tokens` tokens
    of `text`, or without text on that many random tokens drawn with `seed`."""
    if graph not in GRAPHS:
        raise SparseccError(f"unknown graph form {graph!r}; use --graph window or --graph step")
    with _hushed():
        return _export(source, out, graph, check_tokens, seed, text)


def _export(source, out, graph: str, check_tokens: int, seed: int, text) -> dict:
    if not 2 <= check_tokens <= MAX_PAST:
        raise SparseccError(f"check_tokens must be between 2 and {MAX_PAST} (got {check_tokens}); e.g. --check-tokens 16")
    check_output_dir(Path(out), [source, *([text] if text is not None else [])])   # before the slow load
    tokens = check_tokens_from_text(source, text, check_tokens) if text is not None else None
    log(f"export: loading {source}")
    lm, tokenizer = load_causal_lm(source)
    with atomic_dir(out) as tmp:
        log(f"export: {type(lm).__name__} -> {graph} graph (torch.onnx.export, dynamo)")
        if graph == "step":
            spec = export_step_graph(lm, tmp / "model.onnx").spec
        else:
            export_window_graph(lm, tmp / "model.onnx")
        if tokens is None:
            tokens = np.random.default_rng(seed).integers(0, lm.config.vocab_size, check_tokens).tolist()
        log(f"export: checking ONNX Runtime against PyTorch over {len(tokens)} tokens")
        check = check_parity(lm, tmp / "model.onnx", tokens)
        if not check["ok"]:
            raise SparseccError(f"exported {graph} graph differs from PyTorch: max |diff| {check['max_abs_diff']:.3g} "
                                f"over {check['tokens']} tokens > {check['tolerance']:.3g}; not written")
        if tokenizer is not None:
            tokenizer(tmp)
        check["text"] = str(Path(text).resolve()) if text is not None else None
        report = {"schema": "sparsecc.export/1", "source": str(Path(source).resolve()), "graph": graph,
                  "arch": lm.config.model_type, "class": type(lm).__name__,
                  "exporter": "torch.onnx.export(dynamo=True), opset 18", "check": check}
        if graph == "step":
            report |= {"arch": spec.arch, "states": len(spec.states), "state_bytes": spec.state_bytes(0),
                       "state_grows": any(s.grow_axis is not None for s in spec.states),
                       "state_bytes_per_token": spec.state_bytes(1) - spec.state_bytes(0)}
        from sparsecc.report import dumps

        (tmp / "report.json").write_text(dumps(report), encoding="utf-8")
    return report
