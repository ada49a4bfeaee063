"""`sparsecc export`: a transformers causal LM as a single-token step graph (see
`sparsecc.stepgraph` for the graph's interface and metadata, `sparsecc.step_models` for the
wrappers).

Exported with `torch.onnx.export(dynamo=True)`, opset 18. The output folder holds
`model.onnx`, the tokenizer when the source has one, and `report.json`: the states, their
bytes, and the check that ONNX Runtime's logits equal the PyTorch model's, run on the whole
sequence, token by token over `check_tokens` tokens.
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
MAX_PAST = 4096  # the longest KV cache a decode graph accepts


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
        lm = AutoModelForCausalLM.from_pretrained(str(source), dtype="float32")
    if not (source / "tokenizer.json").is_file():
        return lm.eval(), None
    return lm.eval(), lambda folder: shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")


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
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (token, *example), dynamo=True, opset_version=18, verbose=False,
            input_names=[TOKEN] + [state_input(i) for i in range(len(example))],
            output_names=[LOGITS] + [state_output(i) for i in range(len(example))],
            dynamic_shapes=(None, tuple(dynamic)) if any(dynamic) else None)
    model = program.model
    model.metadata_props[METADATA_KEY] = spec.to_json()
    model.producer_name = "sparsecc export"
    save_model(model, path)
    return wrapper


def check_parity(lm, path: Path, tokens: list[int]) -> dict:
    """ONNX Runtime on the step graph, one token at a time, against the PyTorch model on the
    whole sequence: max |diff| of the logits."""
    torch = _torch()
    from sparsecc.runtime import load_session

    onnx_logits = load_session(path).logits(tokens)
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


def export(source: str | Path, out: str | Path, check_tokens: int = 16, seed: int = 0,
           text: str | Path | None = None) -> dict:
    """Export the model at `source` into the folder `out` (replaced atomically); return the
    report. The check runs on the first `check_tokens` tokens of `text`, or without text on
    that many random tokens drawn with `seed`."""
    with _hushed():
        return _export(source, out, check_tokens, seed, text)


def _export(source, out, check_tokens: int, seed: int, text) -> dict:
    if not 2 <= check_tokens <= MAX_PAST:
        raise SparseccError(f"check_tokens must be between 2 and {MAX_PAST} (got {check_tokens}); e.g. --check-tokens 16")
    check_output_dir(Path(out), [source, *([text] if text is not None else [])])   # before the slow load
    tokens = check_tokens_from_text(source, text, check_tokens) if text is not None else None
    log(f"export: loading {source}")
    lm, tokenizer = load_causal_lm(source)
    with atomic_dir(out) as tmp:
        log(f"export: {type(lm).__name__} -> step graph (torch.onnx.export, dynamo)")
        wrapper = export_step_graph(lm, tmp / "model.onnx")
        if tokens is None:
            tokens = np.random.default_rng(seed).integers(0, lm.config.vocab_size, check_tokens).tolist()
        log(f"export: checking ONNX Runtime against PyTorch over {len(tokens)} tokens")
        check = check_parity(lm, tmp / "model.onnx", tokens)
        if not check["ok"]:
            raise SparseccError(f"exported step graph differs from PyTorch: max |diff| {check['max_abs_diff']:.3g} "
                                f"over {check['tokens']} tokens > {check['tolerance']:.3g}; not written")
        if tokenizer is not None:
            tokenizer(tmp)
        spec = wrapper.spec
        check["text"] = str(Path(text).resolve()) if text is not None else None
        report = {"schema": "sparsecc.export/1", "source": str(Path(source).resolve()), "arch": spec.arch,
                  "exporter": "torch.onnx.export(dynamo=True), opset 18",
                  "states": len(spec.states), "state_bytes": spec.state_bytes(0),
                  "state_grows": any(s.grow_axis is not None for s in spec.states),
                  "state_bytes_per_token": spec.state_bytes(1) - spec.state_bytes(0), "check": check}
        from sparsecc.report import dumps

        (tmp / "report.json").write_text(dumps(report), encoding="utf-8")
    return report
