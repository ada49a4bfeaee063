"""The bad-input corpus: every case is a spoiled input (a file, a flag, a folder) given to
`sparsecc compile`, `eval`, `simulate` or `export`, with the fragments its error line must
contain: one naming the problem, one naming the fix. Each case must exit 2 with exactly one
line on stderr, `sparsecc: error: ...` (progress lines before it are allowed, nothing else),
no traceback (with -v: the SparseccError is raised, so a traceback is shown), nothing on
stdout, and nothing written: no output folder, no temporary folder beside it, no cache, the
inputs untouched, no temporary files left (conftest's autouse fixture).

The one kind that is not an error, an op the seneca backend has no handler for, is tested
at the end: the compile succeeds, the node is declined with its reason, and the rest is
compiled, simulated and reported.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    SAMPLE,
    TOKENIZER_VOCAB,
    VALID_TXT,
    Builder,
    listing,
    llama_model,
    mlp_feeds,
    mlp_model,
    save,
    save_npz,
)
from onnx import TensorProto, helper

import sparsecc
from sparsecc import cli
from sparsecc.backends.seneca.target import builtin
from sparsecc.errors import SparseccError


def _external(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


def _relocate(path: Path, location: str) -> None:
    """Point every external initializer of the model at `path` to `location`."""
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


class Inputs:
    """Valid inputs in tmp/in, to be spoiled one at a time."""

    def __init__(self, root: Path, seneca_compile: Callable[[], Path] | None = None):
        self.root = root
        self._seneca_compile = seneca_compile
        self.dir = root / "in"
        self.model = save(mlp_model(), self.dir / "model.onnx")
        self.npz = save_npz(mlp_feeds(2, rows=8), self.dir / "calib.npz")
        self.lm = save(llama_model(vocab=TOKENIZER_VOCAB), self.dir / "lm.onnx")
        self.text = self.dir / "calib.txt"
        with open(VALID_TXT, encoding="utf-8") as f:
            self.text.write_text(f.read(20_000), encoding="utf-8")

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        return path

    def compile(self, model=None, *extra, calib=None) -> list[str]:
        return ["compile", str(model or self.model), "--calib", str(calib or self.npz), *extra]

    def text_compile(self, *extra, text=None, tokenizer=SAMPLE) -> list[str]:
        args = ["compile", str(self.lm), "--calib", str(text or self.text), "--seq-len", "32", "--windows", "2"]
        return args + (["--tokenizer", str(tokenizer)] if tokenizer is not None else []) + list(extra)

    def seneca(self) -> Path:
        """A copy of a `compile --target seneca` folder (of `lm`, text calibrated), to spoil."""
        folder = self.dir / "seneca"
        shutil.copytree(self._seneca_compile(), folder)
        return folder

    def simulate(self, folder: Path | None = None, *extra, text=None) -> list[str]:
        return ["simulate", str(folder or self.seneca()), "--text", str(text or self.text), "--tokens", "8", *extra]


def truncated_model(i: Inputs):
    raw = i.model.read_bytes()
    return i.compile(i.file("truncated.onnx", raw[: len(raw) // 2]))


def truncated_by_one(i: Inputs):
    return i.compile(i.file("truncated1.onnx", i.model.read_bytes()[:-1]))


def corrupt_model(i: Inputs):
    raw = bytearray(i.model.read_bytes())
    raw[10:60] = np.random.default_rng(1).bytes(50)
    return i.compile(i.file("corrupt.onnx", bytes(raw)))


def random_bytes(i: Inputs):
    return i.compile(i.file("random.onnx", np.random.default_rng(0).bytes(4096)))


def text_file_as_model(i: Inputs):
    return i.compile(i.file("notes.onnx", "this is a text file, not an ONNX model\n" * 20))


def empty_model(i: Inputs):
    return i.compile(i.file("empty.onnx", b""))


def opset13(i: Inputs):
    model = mlp_model()
    model.opset_import[0].version = 13
    return i.compile(save(model, i.dir / "opset13.onnx"))


def model_is_a_folder(i: Inputs):
    # a folder holding model.onnx (a compile output) is a model; one without is not
    (i.dir / "models").mkdir()
    return i.compile(i.dir / "models")


def missing_model(i: Inputs):
    return i.compile(i.dir / "nope.onnx")


def missing_external_data(i: Inputs):
    path = _external(mlp_model(), i.dir / "ext" / "model.onnx")
    (path.parent / "model.onnx.data").unlink()
    return i.compile(path)


def external_data_outside_folder(i: Inputs):
    path = _external(mlp_model(), i.dir / "ext" / "model.onnx")
    # The file exists (one folder up), so only the location makes it unacceptable.
    (path.parent / "model.onnx.data").rename(path.parent.parent / "x")
    _relocate(path, "../x")
    return i.compile(path)


def external_data_absolute_path(i: Inputs):
    path = _external(mlp_model(), i.dir / "ext" / "model.onnx")
    data = path.parent / "model.onnx.data"
    _relocate(path, str(data.resolve()))
    return i.compile(path)


def truncated_external_data(i: Inputs):
    path = _external(mlp_model(), i.dir / "ext" / "model.onnx")
    data = path.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return i.compile(path)


def missing_calibration_file(i: Inputs):
    return i.text_compile(text=i.dir / "missing.txt")


def missing_npz(i: Inputs):
    return i.compile(calib=i.dir / "missing.npz")


def corrupt_npz(i: Inputs):
    return i.compile(calib=i.file("bad.npz", b"PK\x03\x04 not really a zip"))


def non_utf8_text(i: Inputs):
    return i.text_compile(text=i.file("latin1.txt", "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 200))


def empty_text(i: Inputs):
    return i.text_compile(text=i.file("empty.txt", ""))


def blank_text(i: Inputs):
    return i.text_compile(text=i.file("blank.txt", "  \n\n\t\n"))


def empty_text_folder(i: Inputs):
    (i.dir / "no-texts").mkdir()
    return i.text_compile(text=i.dir / "no-texts")


def missing_tokenizer(i: Inputs):
    return i.text_compile(tokenizer=i.dir / "no-such-tokenizer")


def tokenizer_folder_without_json(i: Inputs):
    (i.dir / "tok").mkdir()
    return i.text_compile(tokenizer=i.dir / "tok")


def corrupt_tokenizer(i: Inputs):
    return i.text_compile(tokenizer=i.file("tokenizer.json", "{not json"))


def no_tokenizer_for_text(i: Inputs):
    return i.text_compile(tokenizer=None)


def sparsity_one(i: Inputs):
    return i.compile(None, "--sparsity", "1.0")


def sparsity_negative(i: Inputs):
    return i.compile(None, "--sparsity", "-0.1")


def sparsity_negative_equals(i: Inputs):
    return i.compile(None, "--sparsity=-0.1")


def sparsity_not_a_number(i: Inputs):
    return i.compile(None, "--sparsity", "half")


def sparsity_nan(i: Inputs):
    return i.compile(None, "--sparsity", "nan")


def negative_refine(i: Inputs):
    return i.compile(None, "--refine", "-1")


def zero_windows_npz(i: Inputs):
    return i.compile(None, "--windows", "0")


def negative_windows_npz(i: Inputs):
    return i.compile(None, "--windows", "-1")


def zero_windows_text(i: Inputs):
    return i.text_compile("--windows", "0")


def seq_len_one(i: Inputs):
    return i.text_compile("--seq-len", "1")


def _pipeline(i: Inputs, text: str | bytes):
    return ["compile", str(i.model), "--calib", str(i.npz), "--pipeline", str(i.file("pipeline.yaml", text))]


def malformed_yaml(i: Inputs):
    return _pipeline(i, "passes: [discover-sites, {pass: insert-thresholds\n")


def yaml_with_tabs(i: Inputs):
    return _pipeline(i, "passes:\n\t- discover-sites\n")


def yaml_not_utf8(i: Inputs):
    return _pipeline(i, b"passes:\n- pass: discover-sites # \xff\xfe\n")


def yaml_top_level_list(i: Inputs):
    return _pipeline(i, "- discover-sites\n- insert-thresholds\n")


def yaml_empty(i: Inputs):
    return _pipeline(i, "")


def yaml_pass_without_name(i: Inputs):
    return _pipeline(i, "passes:\n- sparsity: 0.5\n")


def yaml_pass_name_not_a_string(i: Inputs):
    return _pipeline(i, "passes:\n- pass: [discover-sites, insert-thresholds]\n")


def yaml_id_not_a_string(i: Inputs):
    return _pipeline(i, "passes:\n- pass: discover-sites\n  id: [1, 2]\n")


def yaml_unknown_key(i: Inputs):
    return _pipeline(i, "passes: [discover-sites]\nthresholds: 3\n")


def yaml_bad_schema(i: Inputs):
    return _pipeline(i, "schema: sparsecc.pipeline/9\npasses: [discover-sites]\n")


def yaml_bad_data_value(i: Inputs):
    return _pipeline(i, "passes: [discover-sites]\ndata:\n  windows: many\n")


def yaml_bad_data_path(i: Inputs):
    return _pipeline(i, "passes: [discover-sites]\ndata:\n  calib: [a, b]\n")


def yaml_bad_option_value(i: Inputs):
    return _pipeline(i, "passes:\n- discover-sites\n- insert-thresholds\n- pass: calibrate-thresholds\n  sparsity: 1.5\n")


def yaml_unknown_pass(i: Inputs):
    return _pipeline(i, "passes:\n- discover-sites\n- insert-thresholds\n- pass: prune-heads\n")


def missing_pipeline_file(i: Inputs):
    return ["compile", str(i.model), "--calib", str(i.npz), "--pipeline", str(i.dir / "nope.yaml")]


def unknown_backend(i: Inputs):
    return i.compile(None, "--target", "loihi9")


def eval_corrupt_model(i: Inputs):
    return ["eval", str(i.file("bad.onnx", b"\x08\x07garbage")), "--ppl", str(i.npz)]


def eval_without_data(i: Inputs):
    return ["eval", str(i.model)]


def eval_missing_reference(i: Inputs):
    return ["eval", str(i.model), "--ppl", str(i.npz), "--reference", str(i.dir / "nope.onnx")]




# More model files ------------------------------------------------------------------------------
def opset_from_the_future(i: Inputs):
    model = mlp_model()
    model.opset_import[0].version = 99
    return i.compile(save(model, i.dir / "opset99.onnx"))


def ir_version_from_the_future(i: Inputs):
    model = mlp_model()
    model.ir_version = 99
    return i.compile(save(model, i.dir / "ir99.onnx"))


def unknown_op(i: Inputs):
    model = mlp_model()
    model.graph.node[1].op_type = "FooBar"
    return i.compile(save(model, i.dir / "foobar.onnx"))


def unknown_op_domain(i: Inputs):
    model = mlp_model()
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    model.graph.node[1].domain = "com.acme"
    return i.compile(save(model, i.dir / "acme.onnx"))


def only_a_head(i: Inputs):
    """One MatMul to the output: the head, kept dense, so nothing to threshold."""
    b = Builder(5)
    y = b.op("MatMul", ["x", b.weight("w_head", (32, 10))], name="head")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])
    return i.compile(save(b.model([x], {"y": (y, ["n", 10])}), i.dir / "head-only.onnx"))


def no_linear_sites(i: Inputs):
    b = Builder(6)
    y = b.op("Relu", [b.op("Add", ["x", b.const("bias", np.ones(32, np.float32))])])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])
    return i.compile(save(b.model([x], {"y": (y, ["n", 32])}), i.dir / "no-sites.onnx"))


# More calibration data ---------------------------------------------------------------------------
def npz_wrong_dtype(i: Inputs):
    path = i.dir / "int.npz"
    np.savez(path, x=np.zeros((2, 8, 32), np.int64))
    return i.compile(calib=path)


def npz_wrong_shape(i: Inputs):
    path = i.dir / "narrow.npz"
    np.savez(path, x=np.zeros((2, 8, 31), np.float32))
    return i.compile(calib=path)


def npz_missing_input(i: Inputs):
    path = i.dir / "other.npz"
    np.savez(path, y=np.zeros((2, 8, 32), np.float32))
    return i.compile(calib=path)


def npz_zero_samples(i: Inputs):
    path = i.dir / "none.npz"
    np.savez(path, x=np.zeros((0, 8, 32), np.float32))
    return i.compile(calib=path)


def npz_zero_tokens(i: Inputs):
    path = i.dir / "no-tokens.npz"
    np.savez(path, input_ids=np.zeros((2, 1, 0), np.int64))
    return ["compile", str(i.lm), "--calib", str(path)]


def npz_nan_values(i: Inputs):
    path = i.dir / "nan.npz"
    np.savez(path, x=np.full((2, 8, 32), np.nan, np.float32))
    return i.compile(calib=path)


def npz_token_ids_beyond_vocabulary(i: Inputs):
    path = i.dir / "ids.npz"
    np.savez(path, input_ids=np.full((2, 1, 8), 10**6, np.int64))
    return ["compile", str(i.lm), "--calib", str(path)]


def npz_object_array(i: Inputs):
    path = i.dir / "pickled.npz"
    np.savez(path, x=np.array([[1, "a"]], dtype=object))
    return i.compile(calib=path)


def tokenizer_larger_than_model(i: Inputs):
    """The sample's tokenizer (2048 tokens) on a model with 24: ids beyond the embedding."""
    return ["compile", str(save(llama_model(vocab=24), i.dir / "small-vocab.onnx")), "--calib", str(i.text),
            "--tokenizer", str(SAMPLE), "--seq-len", "32", "--windows", "2"]


def non_utf8_text_in_folder(i: Inputs):
    i.file("texts/a.txt", "fine text\n" * 100)
    i.file("texts/b.txt", b"\xff\xfe\x00broken\n")
    return i.text_compile(text=i.dir / "texts")


# Absurd sizes --------------------------------------------------------------------------------------
def absurd_seq_len(i: Inputs):
    return i.text_compile("--seq-len", str(10**9))


def zero_seq_len(i: Inputs):
    return i.text_compile("--seq-len", "0")


def absurd_refine(i: Inputs):
    return i.compile(None, "--refine", str(10**9))


def absurd_max_context(i: Inputs):
    """K/V room for 10^12 positions on the LM's attention."""
    pipeline = i.file("pipeline.yaml", "passes:\n- discover-sites\n- pass: partition\n  max_context: 1000000000000\n")
    return ["compile", str(i.lm), "--pipeline", str(pipeline), "--target", "seneca"]


def negative_compensation_rank(i: Inputs):
    return i.compile(None, "--compensate-rank", "-3")


def negative_finetune_steps(i: Inputs):
    return i.compile(None, "--finetune-steps", "-3")


# Target files (the partition pass's `target` option) ----------------------------------------------
def _target(i: Inputs, name: str, edit: Callable[[str], str]) -> Path:
    return i.file(name, edit(builtin()["seneca"].read_text(encoding="utf-8")))


def _drop_entry(text: str) -> str:
    return re.sub(r"(?m)^mul = .*\n", "", text, count=1)


def _negative_entry(text: str) -> str:
    return re.sub(r"(?m)^(mul = \{ value = )", r"\g<1>-", text, count=1)


def _target_compile(i: Inputs, target: Path):
    return _pipeline(i, f"passes:\n- discover-sites\n- pass: partition\n  target: {target}\n") + ["--target", "seneca"]


def target_missing_entry(i: Inputs):
    return _target_compile(i, _target(i, "no-mul.toml", _drop_entry))


def target_negative_entry(i: Inputs):
    return _target_compile(i, _target(i, "negative.toml", _negative_entry))


def target_negative_mesh(i: Inputs):
    return _target_compile(i, _target(i, "mesh.toml", lambda t: t.replace("rows = { value = 32", "rows = { value = -4")))


def target_missing_section(i: Inputs):
    return _target_compile(i, _target(i, "no-noc.toml", lambda t: t.replace("[noc]", "[noc_old]")))


def target_not_toml(i: Inputs):
    return _target_compile(i, i.file("broken.toml", "[mesh\nrows = 3\n"))


def target_file_missing(i: Inputs):
    return _target_compile(i, i.dir / "nope.toml")


# eval ----------------------------------------------------------------------------------------------
def eval_opset13(i: Inputs):
    model = mlp_model()
    model.opset_import[0].version = 13
    return ["eval", str(save(model, i.dir / "opset13.onnx")), "--ppl", str(i.npz)]


def eval_random_bytes(i: Inputs):
    return ["eval", str(i.file("random.onnx", np.random.default_rng(5).bytes(2048))), "--ppl", str(i.npz)]


def eval_external_data_outside_folder(i: Inputs):
    path = _external(mlp_model(), i.dir / "ext" / "model.onnx")
    (path.parent / "model.onnx.data").rename(path.parent.parent / "secret.bin")
    _relocate(path, "../secret.bin")
    return ["eval", str(path), "--ppl", str(i.npz)]


def eval_missing_external_data(i: Inputs):
    path = _external(mlp_model(), i.dir / "ext" / "model.onnx")
    (path.parent / "model.onnx.data").unlink()
    return ["eval", str(path), "--ppl", str(i.npz)]


def eval_empty_text(i: Inputs):
    return ["eval", str(i.lm), "--ppl", str(i.file("empty.txt", "")), "--tokenizer", str(SAMPLE)]


def eval_non_utf8_text(i: Inputs):
    return ["eval", str(i.lm), "--ppl", str(i.file("latin1.txt", "na\xefve\n".encode("latin-1") * 100)),
            "--tokenizer", str(SAMPLE)]


def eval_absurd_seq_len(i: Inputs):
    return ["eval", str(i.lm), "--ppl", str(i.text), "--tokenizer", str(SAMPLE), "--seq-len", str(2**70)]


def eval_zero_windows(i: Inputs):
    return ["eval", str(i.model), "--ppl", str(i.npz), "--windows", "0"]


def eval_wrong_shape(i: Inputs):
    path = i.dir / "narrow.npz"
    np.savez(path, x=np.zeros((2, 8, 31), np.float32))
    return ["eval", str(i.model), "--ppl", str(path)]


def eval_corrupt_config(i: Inputs):
    """A compiled folder whose config.yaml (read for the tokenizer and reference) is garbage."""
    folder = i.dir / "compiled"
    folder.mkdir()
    shutil.copy(i.model, folder / "model.onnx")
    (folder / "config.yaml").write_text("data: [unclosed\n")
    return ["eval", str(folder / "model.onnx"), "--ppl", str(i.npz)]


def eval_corrupt_reference(i: Inputs):
    return ["eval", str(i.model), "--ppl", str(i.npz), "--reference", str(i.file("ref.onnx", b"\x00" * 64))]


# simulate --------------------------------------------------------------------------------------------
def simulate_missing_folder(i: Inputs):
    return i.simulate(i.dir / "nowhere")


def simulate_model_file_not_folder(i: Inputs):
    return i.simulate(i.model)


def simulate_ort_compile(i: Inputs):
    sparsecc.compile_model(i.model, sparsecc.default_pipeline(sparsity=0.3), mlp_feeds(2, rows=8), out=i.dir / "ort")
    return i.simulate(i.dir / "ort")


def simulate_zero_tokens(i: Inputs):
    return i.simulate(None, "--tokens", "0")


def simulate_one_token(i: Inputs):
    return i.simulate(None, "--tokens", "1")


def simulate_zero_windows(i: Inputs):
    return i.simulate(None, "--windows", "0")


def simulate_absurd_tokens(i: Inputs):
    return i.simulate(None, "--tokens", str(10**9))


def simulate_empty_text(i: Inputs):
    return i.simulate(None, text=i.file("empty.txt", ""))


def simulate_non_utf8_text(i: Inputs):
    return i.simulate(None, text=i.file("latin1.txt", "d\xe9j\xe0 vu\n".encode("latin-1") * 100))


def simulate_missing_text(i: Inputs):
    return i.simulate(None, text=i.dir / "nope.txt")


def simulate_truncated_model(i: Inputs):
    folder = i.seneca()
    raw = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(raw[: len(raw) // 3])
    return i.simulate(folder)


def simulate_missing_placement(i: Inputs):
    folder = i.seneca()
    (folder / "placement.json").unlink()
    return i.simulate(folder)


def simulate_target_missing_entry(i: Inputs):
    folder = i.seneca()
    (folder / "target.toml").write_text(_drop_entry((folder / "target.toml").read_text()))
    return i.simulate(folder)


def simulate_target_negative_entry(i: Inputs):
    folder = i.seneca()
    (folder / "target.toml").write_text(_negative_entry((folder / "target.toml").read_text()))
    return i.simulate(folder)


def simulate_target_random_bytes(i: Inputs):
    folder = i.seneca()
    (folder / "target.toml").write_bytes(np.random.default_rng(2).bytes(300))
    return i.simulate(folder)


def simulate_corrupt_config(i: Inputs):
    folder = i.seneca()
    (folder / "config.yaml").write_text("data: {tokenizer: [\n")
    return i.simulate(folder)


def simulate_positions_on_a_window_model(i: Inputs):
    return i.simulate(None, "--positions", "4")


# export ------------------------------------------------------------------------------------------------
def export_missing_source(i: Inputs):
    return ["export", str(i.dir / "no-model")]


def export_empty_folder(i: Inputs):
    (i.dir / "empty-model").mkdir()
    return ["export", str(i.dir / "empty-model")]


def export_onnx_file(i: Inputs):
    return ["export", str(i.model)]


def export_malformed_config(i: Inputs):
    i.file("hf/config.json", "{not json")
    return ["export", str(i.dir / "hf")]


def export_config_without_weights(i: Inputs):
    i.file("hf/config.json", json.dumps({"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
                                         "intermediate_size": 16, "num_hidden_layers": 1,
                                         "num_attention_heads": 2}))
    return ["export", str(i.dir / "hf")]


def export_random_gguf(i: Inputs):
    return ["export", str(i.file("model.gguf", np.random.default_rng(3).bytes(4096)))]


def export_truncated_weights(i: Inputs):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(i.dir / "hf")
    weights = i.dir / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["export", str(i.dir / "hf")]


def export_unsupported_architecture(i: Inputs):
    from transformers import BertConfig

    BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16).save_pretrained(i.dir / "bert")   # a config is all the refusal reads
    return ["export", str(i.dir / "bert")]


def export_one_check_token(i: Inputs):
    return ["export", str(i.dir), "--check-tokens", "1"]


def export_absurd_check_tokens(i: Inputs):
    return ["export", str(i.dir), "--check-tokens", str(10**9)]


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[Inputs], list[str]]   # spoils an input, returns the argv (without -o)
    kind: str                             # which kind of bad input (KINDS)
    problem: str                          # the error line names the problem ...
    fix: str                              # ... and the fix

    @property
    def name(self) -> str:
        return self.make.__name__


# The kinds of bad input issue 7 asks for, and the others found on the way.
KINDS = {
    "truncated file", "random bytes", "wrong opset", "external data missing", "external data outside the folder",
    "empty text", "non-UTF-8 text", "zero tokens", "absurd size", "malformed YAML", "target file missing entry",
    "target file negative entry",
    # beyond the issue's list
    "not a model", "wrong path", "bad data", "bad tokenizer", "bad flag value", "bad pipeline", "bad target file",
    "bad compiled folder", "bad export source", "nothing to threshold",
}

C = Case
CORPUS = [
    # model files
    C(truncated_model, "truncated file", "not a valid ONNX model", "re-export the model"),
    C(truncated_by_one, "truncated file", "not a valid ONNX model", "re-export the model"),
    C(corrupt_model, "random bytes", "not a valid ONNX model", "re-export the model"),
    C(random_bytes, "random bytes", "not a valid ONNX model", "re-export the model"),
    C(text_file_as_model, "not a model", "not a valid ONNX model", "check the path"),
    C(empty_model, "truncated file", "holds no ONNX graph", "check the path"),
    C(opset13, "wrong opset", "uses opset 13", "re-export with opset_version>=17"),
    C(opset_from_the_future, "wrong opset", "uses opset 99", "re-export it for opset"),
    C(ir_version_from_the_future, "wrong opset", "IR version 99", "upgrade onnx and onnxruntime"),
    C(unknown_op, "not a model", "No Op registered for FooBar", "check its opset, IR version and operators"),
    C(unknown_op_domain, "not a model", "com.acme:MatMul(-1) is not a registered", "check its opset"),
    C(only_a_head, "nothing to threshold", "1 linear site(s) are 1 head(s), kept dense", "pass --include-head"),
    C(no_linear_sites, "nothing to threshold", "the model has no linear sites",
      "compile it without --calib/--sparsity"),
    C(model_is_a_folder, "wrong path", "is a folder without model.onnx", "pass an .onnx file or the -o folder of `sparsecc compile`"),
    C(missing_model, "wrong path", "model file not found", "check the path"),
    C(missing_external_data, "external data missing", "is missing", "copy it next to the model"),
    C(external_data_outside_folder, "external data outside the folder", "outside the model's folder (../x)",
      "keep external data beside the model"),
    C(external_data_absolute_path, "external data outside the folder", "outside the model's folder",
      "keep external data beside the model"),
    C(truncated_external_data, "truncated file", "is truncated", "copy it again"),
    # calibration data
    C(missing_calibration_file, "wrong path", "text data not found", "check the path"),
    C(missing_npz, "wrong path", "feed file not found", "check the path"),
    C(corrupt_npz, "random bytes", "is not a readable .npz", "save feeds with numpy.savez"),
    C(npz_object_array, "bad data", "is not a readable .npz", "save feeds with numpy.savez"),
    C(npz_wrong_dtype, "bad data", "Unexpected input data type", "check that the data fits the model's inputs"),
    C(npz_wrong_shape, "bad data", "Got invalid dimensions for input: x", "check that the data fits"),
    C(npz_missing_input, "bad data", "lacks model input 'x'", "(has ['y'])"),
    C(npz_zero_samples, "zero tokens", "non-zero number of samples", "every array needs"),
    C(npz_zero_tokens, "zero tokens", "samples of 'input_ids' are empty", "at least one token"),
    C(npz_nan_values, "bad data", "NaN or infinite values", "check the feeds"),
    C(npz_token_ids_beyond_vocabulary, "bad data", "indices element out of data bounds", "token ids within its vocabulary"),
    C(tokenizer_larger_than_model, "bad tokenizer", "indices element out of data bounds",
      "token ids within its vocabulary"),
    C(non_utf8_text, "non-UTF-8 text", "is not UTF-8 text", "convert it to UTF-8"),
    C(non_utf8_text_in_folder, "non-UTF-8 text", "b.txt is not UTF-8 text", "convert it to UTF-8"),
    C(empty_text, "empty text", "holds no text", "give a non-empty text file"),
    C(blank_text, "empty text", "holds no text", "give a non-empty text file"),
    C(empty_text_folder, "empty text", "no .txt files under", "point at a text file or a folder of .txt files"),
    C(missing_tokenizer, "bad tokenizer", "tokenizer not found", "pass a tokenizer.json"),
    C(tokenizer_folder_without_json, "bad tokenizer", "no tokenizer.json in", "pass a tokenizer.json"),
    C(corrupt_tokenizer, "bad tokenizer", "cannot read tokenizer", "pass a valid tokenizer.json"),
    C(no_tokenizer_for_text, "bad tokenizer", "text data needs a tokenizer", "pass --tokenizer"),
    # flags
    C(sparsity_one, "bad flag value", "sparsity must be in [0, 1)", "e.g. 0.5, the default"),
    C(sparsity_negative, "bad flag value", "sparsity must be in [0, 1)", "e.g. 0.5, the default"),
    C(sparsity_negative_equals, "bad flag value", "sparsity must be in [0, 1)", "e.g. 0.5, the default"),
    C(sparsity_not_a_number, "bad flag value", "got 'half'", "sparsity must be float"),
    C(sparsity_nan, "bad flag value", "(got nan)", "sparsity must be in [0, 1)"),
    C(negative_refine, "bad flag value", "(got -1)", "refine must be in [0, 100]"),
    C(absurd_refine, "absurd size", "(got 1000000000)", "refine must be in [0, 100]"),
    C(zero_windows_npz, "bad flag value", "(got 0)", "window count must be at least 1"),
    C(negative_windows_npz, "bad flag value", "(got -1)", "window count must be at least 1"),
    C(zero_windows_text, "bad flag value", "(got 0)", "window count must be at least 1"),
    C(seq_len_one, "zero tokens", "window length 1 is too short", "use --seq-len 2 or more"),
    C(zero_seq_len, "zero tokens", "window length 0 is too short", "use --seq-len 2 or more"),
    C(absurd_seq_len, "absurd size", "fewer than one window of 1000000000", "a smaller --seq-len"),
    C(absurd_max_context, "absurd size", "of data memory", "a max_context below 1000000000000"),
    C(negative_compensation_rank, "bad flag value", "(got -3)", "rank must be at least 1"),
    C(negative_finetune_steps, "bad flag value", "(got -3", "must be at least 1"),
    C(unknown_backend, "bad flag value", "unknown backend 'loihi9'", "installed backends: ort, seneca"),
    # pipeline files
    C(malformed_yaml, "malformed YAML", "is not valid YAML at line 2", "fix the file"),
    C(yaml_with_tabs, "malformed YAML", "is not valid YAML at line 2", "fix the file"),
    C(yaml_not_utf8, "malformed YAML", "is not valid YAML", "fix the file"),
    C(yaml_top_level_list, "bad pipeline", "expected a mapping", "with a `passes:` list"),
    C(yaml_empty, "bad pipeline", "expected a mapping", "with a `passes:` list"),
    C(yaml_pass_without_name, "bad pipeline", "passes[1]", "needs a `pass:` name"),
    C(yaml_pass_name_not_a_string, "bad pipeline", "passes[1]", "needs a `pass:` name"),
    C(yaml_id_not_a_string, "bad pipeline", "(got [1, 2])", "`id` must be a string"),
    C(yaml_unknown_key, "bad pipeline", "unknown key 'thresholds'", "valid keys: schema, passes, data"),
    C(yaml_bad_schema, "bad pipeline", "unsupported schema 'sparsecc.pipeline/9'", "reads sparsecc.pipeline/1"),
    C(yaml_bad_data_value, "bad pipeline", "(got 'many')", "windows must be an integer"),
    C(yaml_bad_data_path, "bad pipeline", "(got ['a', 'b'])", "calib must be a path"),
    C(yaml_bad_option_value, "bad pipeline", "(got 1.5)", "sparsity must be in [0, 1)"),
    C(yaml_unknown_pass, "bad pipeline", "unknown pass 'prune-heads'", "known passes: allocate-sparsity"),
    C(missing_pipeline_file, "wrong path", "pipeline file not found", "check the path"),
    # target files
    C(target_missing_entry, "target file missing entry", "energy_pj.mul is missing", "add `{ value = ..."),
    C(target_negative_entry, "target file negative entry", "energy_pj.mul must not be negative (got -1.4)", "must not be"),
    C(target_negative_mesh, "target file negative entry", "mesh.rows", "must be a whole number of at least 1"),
    C(target_missing_section, "target file missing entry", "section [noc] is missing", "copy it from"),
    C(target_not_toml, "bad target file", "is not valid TOML", "fix the file"),
    C(target_file_missing, "wrong path", "unknown target", "see `sparsecc list targets`"),
    # eval
    C(eval_corrupt_model, "random bytes", "not a valid ONNX model", "re-export the model"),
    C(eval_random_bytes, "random bytes", "not a valid ONNX model", "re-export the model"),
    C(eval_opset13, "wrong opset", "uses opset 13", "re-export with opset_version>=17"),
    C(eval_external_data_outside_folder, "external data outside the folder", "outside the model's folder (../secret.bin)",
      "keep external data beside the model"),
    C(eval_missing_external_data, "external data missing", "is missing", "copy it next to the model"),
    C(eval_without_data, "wrong path", "eval needs data", "pass --ppl TEXT"),
    C(eval_missing_reference, "wrong path", "model file not found", "check the path"),
    C(eval_corrupt_reference, "random bytes", "ref.onnx", "re-export the model"),
    C(eval_empty_text, "empty text", "holds no text", "give a non-empty text file"),
    C(eval_non_utf8_text, "non-UTF-8 text", "is not UTF-8 text", "convert it to UTF-8"),
    C(eval_absurd_seq_len, "absurd size", f"fewer than one window of {2**70}", "a smaller --seq-len"),
    C(eval_zero_windows, "bad flag value", "(got 0)", "window count must be at least 1"),
    C(eval_wrong_shape, "bad data", "Got invalid dimensions for input: x", "check that the data fits"),
    C(eval_corrupt_config, "malformed YAML", "config.yaml is not valid YAML", "pass --tokenizer/--reference explicitly"),
    # simulate
    C(simulate_missing_folder, "wrong path", "is not a folder", "pass the -o folder of `sparsecc compile"),
    # a model file is taken for its folder (model_io.model_file), which must be a seneca compile's
    C(simulate_model_file_not_folder, "wrong path", "has no target.toml", "simulate reads a folder written by `sparsecc compile"),
    C(simulate_ort_compile, "bad compiled folder", "has no target.toml", "--target seneca -o DIR"),
    C(simulate_zero_tokens, "zero tokens", "--tokens must be at least 2", "--tokens must be at least 2"),
    C(simulate_one_token, "zero tokens", "--tokens must be at least 2", "--tokens must be at least 2"),
    C(simulate_zero_windows, "bad flag value", "--windows at least 1", "--windows at least 1"),
    C(simulate_absurd_tokens, "absurd size", "fewer than one window of 1000000000", "give more text"),
    C(simulate_empty_text, "empty text", "holds no text", "give a non-empty text file"),
    C(simulate_non_utf8_text, "non-UTF-8 text", "is not UTF-8 text", "convert it to UTF-8"),
    C(simulate_missing_text, "wrong path", "text data not found", "check the path"),
    C(simulate_truncated_model, "truncated file", "not a valid ONNX model", "re-export the model"),
    C(simulate_missing_placement, "bad compiled folder", "has no placement.json", "--target seneca -o DIR"),
    C(simulate_target_missing_entry, "target file missing entry", "energy_pj.mul is missing", "add `{ value = ..."),
    C(simulate_target_negative_entry, "target file negative entry", "energy_pj.mul must not be negative", "(got -1.4)"),
    C(simulate_target_random_bytes, "random bytes", "is not valid TOML", "fix the file"),
    C(simulate_corrupt_config, "malformed YAML", "config.yaml is not valid YAML", "pass --tokenizer/--reference"),
    C(simulate_positions_on_a_window_model, "bad flag value", "--positions measures step graphs", "only"),
    # export
    C(export_missing_source, "wrong path", "neither a transformers model folder", "(with config.json) nor a .gguf"),
    C(export_empty_folder, "bad export source", "neither a transformers model folder", "nor a .gguf file"),
    C(export_onnx_file, "not a model", "neither a transformers model folder", "nor a .gguf file"),
    C(export_malformed_config, "bad export source", "is not a valid JSON file", "pass a transformers folder"),
    C(export_config_without_weights, "bad export source", "no file named model.safetensors",
      "pass a transformers folder (config.json + weights)"),
    C(export_truncated_weights, "truncated file", "cannot load", "pass a transformers folder (config.json + weights)"),
    C(export_random_gguf, "random bytes", "not a GGUF file", "pass a transformers folder"),
    C(export_unsupported_architecture, "bad export source", "is an encoder-only (masked LM) model (bert), not a causal LM",
      "or export a decoder-only model"),
    C(export_one_check_token, "zero tokens", "(got 1)", "check_tokens must be between 2 and 4096"),
    C(export_absurd_check_tokens, "absurd size", "(got 1000000000)", "check_tokens must be between 2 and 4096"),
]
IDS = [case.name for case in CORPUS]
MIN_CORPUS = 110
# The kinds issue 7 names, each needed in the corpus (the unsupported op: the last test).
ISSUE_KINDS = ("truncated file", "random bytes", "wrong opset", "external data missing",
               "external data outside the folder", "empty text", "non-UTF-8 text", "zero tokens", "absurd size",
               "malformed YAML", "target file missing entry", "target file negative entry")


def command(case: Case) -> str:
    prefix = case.name.split("_")[0]
    return prefix if prefix in ("eval", "simulate", "export") else "compile"


@pytest.fixture(scope="module")
def seneca_compile(tmp_path_factory) -> Path:
    """`compile --target seneca` of the text-fed test LM, once for the module's simulate cases."""
    root = tmp_path_factory.mktemp("seneca")
    text = root / "calib.txt"
    with open(VALID_TXT, encoding="utf-8") as f:
        text.write_text(f.read(20_000), encoding="utf-8")
    lm = save(llama_model(vocab=TOKENIZER_VOCAB), root / "lm.onnx")
    assert cli.main(["-q", "compile", str(lm), "--calib", str(text), "--tokenizer", str(SAMPLE), "--seq-len", "32",
                     "--windows", "2", "--sparsity", "0.3", "--target", "seneca", "-o", str(root / "out"),
                     "--no-cache"]) == 0
    return root / "out"


def _run_case(case: Case, tmp_path: Path, request, *flags: str):
    """Spoil the inputs; (argv, Inputs, work folder, cache folder, listing of the inputs)."""
    if command(case) == "export":   # torch keeps its compile cache in TMPDIR: not sparsecc's to clean
        request.getfixturevalue("monkeypatch").setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch-cache"))
    inputs = Inputs(tmp_path, lambda: request.getfixturevalue("seneca_compile"))
    args = case.make(inputs)
    work = tmp_path / "work"
    work.mkdir()
    cache = tmp_path / "cache"
    before = listing(inputs.dir)
    args = [*flags, *args, "-o", str(work / "out")] + (["--cache-dir", str(cache)] if args[0] == "compile" else [])
    return args, inputs, work, cache, before


def assert_failed_cleanly(rc, err: str, mention: str):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsecc: error: "), err
    assert mention in lines[0], lines[0]


def _assert_nothing_written(inputs: Inputs, work: Path, cache: Path, before: dict, tmp_path: Path):
    assert list(work.iterdir()) == []              # no output, no temporary or stray folder beside -o
    assert not cache.exists()
    assert not (tmp_path / "default-cache").exists()
    assert listing(inputs.dir) == before           # inputs untouched (a simulate's DIR/simulation included)


@pytest.mark.parametrize("size", [len(CORPUS)], ids=[f"{len(CORPUS)}-cases"])
def test_corpus_size_and_kinds(size):
    """The corpus size shows in this test's id; every kind the issue names is covered, and
    every command has cases."""
    assert size >= MIN_CORPUS and len(set(IDS)) == size
    kinds = {case.kind for case in CORPUS}
    assert kinds <= KINDS and set(ISSUE_KINDS) <= kinds
    per_command = {name: sum(command(c) == name for c in CORPUS) for name in ("compile", "eval", "simulate", "export")}
    assert min(per_command.values()) >= 10, per_command
    for kind in ("truncated file", "random bytes", "empty text", "non-UTF-8 text", "zero tokens", "absurd size"):
        assert len({command(c) for c in CORPUS if c.kind == kind}) >= 3, kind   # across the commands


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_bad_input(case: Case, tmp_path, request, capfd):
    args, inputs, work, cache, before = _run_case(case, tmp_path, request)
    capfd.readouterr()
    rc = cli.main(args)
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert rc == 2, err
    assert lines and lines[-1].startswith("sparsecc: error: "), err
    assert case.problem in lines[-1] and case.fix in lines[-1], lines[-1]
    # before the error line only progress lines: no second error, warning or traceback
    assert not [l for l in lines[:-1] if re.search(r"error|warning|traceback", l, re.IGNORECASE)], err
    assert out == ""
    _assert_nothing_written(inputs, work, cache, before, tmp_path)


@pytest.mark.parametrize("case", CORPUS, ids=IDS)
def test_bad_input_quiet_and_verbose(case: Case, tmp_path, request, capfd):
    """-q: the error line and nothing else. -v: the SparseccError itself (a traceback), still
    nothing written."""
    args, inputs, work, cache, before = _run_case(case, tmp_path, request, "-q")
    capfd.readouterr()
    assert cli.main(args) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("sparsecc: error: "), err
    assert listing(inputs.dir) == before
    with pytest.raises(SparseccError) as raised:
        cli.main(["-v" if a == "-q" else a for a in args])
    assert case.problem in str(raised.value)
    _assert_nothing_written(inputs, work, cache, before, tmp_path)


def test_output_folder_not_written_by_sparsecc(tmp_path, capsys):
    inputs = Inputs(tmp_path)
    out = tmp_path / "work" / "results"
    out.mkdir(parents=True)
    (out / "thesis.tex").write_text("months of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2,3")
    before = listing(tmp_path / "work")
    rc = cli.main(inputs.compile(None, "-o", str(out), "--cache-dir", str(tmp_path / "cache")))
    assert_failed_cleanly(rc, capsys.readouterr().err, "was not written by sparsecc")
    assert listing(tmp_path / "work") == before
    assert not (tmp_path / "cache").exists()


def test_output_path_is_a_file(tmp_path, capsys):
    inputs = Inputs(tmp_path)
    out = inputs.file("taken", "a file")
    rc = cli.main(inputs.compile(None, "-o", str(out), "--no-cache"))
    assert_failed_cleanly(rc, capsys.readouterr().err, "is a file")
    assert out.read_text() == "a file"
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_cache_path_is_a_file(tmp_path, capsys):
    inputs = Inputs(tmp_path)
    cache = inputs.file("cache", "not a folder")
    out = tmp_path / "work" / "out"
    rc = cli.main(inputs.compile(None, "-o", str(out), "--cache-dir", str(cache)))
    assert_failed_cleanly(rc, capsys.readouterr().err, "is a file")
    assert cache.read_text() == "not a folder"
    assert not out.exists()


def test_eval_output_folder_not_written_by_sparsecc(tmp_path, capsys):
    inputs = Inputs(tmp_path)
    out = tmp_path / "work" / "mine"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep")
    rc = cli.main(["eval", str(inputs.model), "--ppl", str(inputs.npz), "-o", str(out)])
    err = capsys.readouterr().err
    assert_failed_cleanly(rc, err, "was not written by sparsecc")
    assert listing(tmp_path / "work") == {"mine": None, "mine/notes.txt": b"keep"}


def test_verbose_shows_the_traceback(tmp_path):
    inputs = Inputs(tmp_path)
    from sparsecc.errors import SparseccError

    with pytest.raises(SparseccError, match="sparsity must be in"):
        cli.main(["-v"] + inputs.compile(None, "--sparsity", "2", "-o", str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def unsupported_op_model(path: Path) -> Path:
    """x -> fc -> LeakyRelu (no seneca handler) -> out -> head."""
    b = Builder(3)
    h = b.op("MatMul", ["x", b.weight("w_fc", (32, 48))], name="fc")
    a = b.op("LeakyRelu", [h], name="leaky", alpha=0.1)
    y = b.op("MatMul", [b.op("MatMul", [a, b.weight("w_out", (48, 32))], name="out"), b.weight("w_head", (32, 10))],
             name="head")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])
    return save(b.model([x], {"y": (y, ["n", 10])}), path)


def test_unsupported_op_on_seneca_is_declined_and_the_rest_reported(tmp_path, capfd):
    """Not an error: the node the cores cannot run is declined with its reason (compile's
    report and log), runs on the host in the simulator, and everything else is compiled,
    simulated against ORT and reported."""
    model = unsupported_op_model(tmp_path / "leaky.onnx")
    feeds = save_npz(mlp_feeds(2, rows=8), tmp_path / "feeds.npz")
    out = tmp_path / "out"
    assert cli.main(["compile", str(model), "--calib", str(feeds), "--sparsity", "0.3", "--target", "seneca",
                     "-o", str(out), "--no-cache"]) == 0
    err = capfd.readouterr().err
    reason = "no seneca handler for LeakyRelu: runs on the host, its cost is not counted"
    assert f"seneca: declined 1 node(s), listed in the report: leaky: {reason}" in err
    report = json.loads((out / "report.json").read_text())
    assert report["target"]["declined"] == {"leaky": reason}
    assert f"- `leaky`: {reason}" in (out / "report.md").read_text()
    assert report["target"]["artifacts"]["handlers"] > 0           # the rest lowered to the cores
    assert {s["node"] for s in report["sites"]} == {"fc", "out", "head"}
    manifest = json.loads((out / "manifest.json").read_text())
    nodes = {e["node"] for entries in manifest["cores"].values() for e in entries}
    assert "leaky" not in nodes and {"fc", "out"} <= nodes
    assert cli.main(["simulate", str(out), "--text", str(feeds), "--json"]) == 0
    sim = json.loads(capfd.readouterr().out)
    assert sim["host_nodes"] == {"leaky": reason}
    assert sim["vs_ort"]["argmax_agreement"] == 1.0                # the host's values are the reference's
    assert sim["sparse"]["energy_pj_per_token"]["total"] > 0 and sim["ratio"]["energy"] > 1
    assert "Run on the host, not in these figures: `leaky`" in (out / "simulation" / "report.md").read_text()
