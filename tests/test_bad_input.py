"""Every bad input: exit code 2, one line on stderr starting 'sparsecc: error:', no traceback,
and nothing written (no output folder, no temporary folder beside it, no cache)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    SAMPLE,
    TOKENIZER_VOCAB,
    VALID_TXT,
    listing,
    llama_model,
    mlp_feeds,
    mlp_model,
    save,
    save_npz,
)

from sparsecc import cli


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

    def __init__(self, root: Path):
        self.root = root
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
    return i.compile(i.dir)


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


CASES = [
    truncated_model, truncated_by_one, corrupt_model, random_bytes, text_file_as_model, empty_model, opset13,
    model_is_a_folder, missing_model, missing_external_data, external_data_outside_folder, external_data_absolute_path,
    truncated_external_data, missing_calibration_file, missing_npz, corrupt_npz, non_utf8_text, empty_text, blank_text,
    empty_text_folder, missing_tokenizer, tokenizer_folder_without_json, corrupt_tokenizer, no_tokenizer_for_text,
    sparsity_one, sparsity_negative, sparsity_negative_equals, sparsity_not_a_number, sparsity_nan, negative_refine,
    zero_windows_npz, negative_windows_npz, zero_windows_text, seq_len_one, malformed_yaml, yaml_with_tabs, yaml_not_utf8,
    yaml_top_level_list, yaml_empty, yaml_pass_without_name, yaml_pass_name_not_a_string, yaml_id_not_a_string,
    yaml_unknown_key, yaml_bad_schema, yaml_bad_data_value, yaml_bad_data_path, yaml_bad_option_value,
    yaml_unknown_pass, missing_pipeline_file, unknown_backend, eval_corrupt_model, eval_without_data,
    eval_missing_reference,
]

# What the one line must mention, so the error is the expected one and not some other.
MENTIONS = {
    truncated_model: "not a valid ONNX model", truncated_by_one: "not a valid ONNX model",
    random_bytes: "not a valid ONNX model", empty_model: "holds no ONNX graph", opset13: "opset 13",
    model_is_a_folder: "is a directory", missing_model: "model file not found",
    missing_external_data: "is missing", external_data_outside_folder: "outside the model's folder",
    external_data_absolute_path: "outside the model's folder", truncated_external_data: "truncated",
    missing_calibration_file: "not found", missing_npz: "not found", non_utf8_text: "not UTF-8",
    empty_text: "holds no text", blank_text: "holds no text", empty_text_folder: "no .txt files",
    missing_tokenizer: "tokenizer not found", tokenizer_folder_without_json: "no tokenizer.json",
    corrupt_tokenizer: "cannot read tokenizer", no_tokenizer_for_text: "needs a tokenizer",
    sparsity_one: "sparsity must be in [0, 1)", sparsity_negative: "sparsity must be in [0, 1)",
    sparsity_negative_equals: "sparsity must be in [0, 1)", sparsity_nan: "sparsity must be in [0, 1)",
    sparsity_not_a_number: "sparsity must be float", zero_windows_npz: "at least 1", negative_windows_npz: "at least 1",
    zero_windows_text: "at least 1", seq_len_one: "too short", malformed_yaml: "not valid YAML",
    yaml_with_tabs: "not valid YAML", yaml_not_utf8: "not valid YAML", yaml_top_level_list: "passes:",
    yaml_pass_without_name: "needs a `pass:` name", yaml_pass_name_not_a_string: "needs a `pass:` name",
    yaml_id_not_a_string: "id", yaml_unknown_key: "unknown key 'thresholds'", yaml_bad_schema: "unsupported schema",
    yaml_bad_data_value: "windows", yaml_bad_data_path: "calib", yaml_bad_option_value: "sparsity must be in [0, 1)",
    yaml_unknown_pass: "unknown pass 'prune-heads'", missing_pipeline_file: "pipeline file not found",
    unknown_backend: "unknown backend 'loihi9'", eval_without_data: "needs data",
    eval_missing_reference: "model file not found",
}


def assert_failed_cleanly(rc, err: str, mention: str | None = None):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsecc: error: "), err
    assert "Traceback" not in err
    if mention:
        assert mention in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    inputs = Inputs(tmp_path)
    args = case(inputs)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    cache = tmp_path / "cache"
    before = listing(inputs.dir)
    args += ["-o", str(out)] + (["--cache-dir", str(cache)] if args[0] == "compile" else [])
    capsys.readouterr()
    rc = cli.main(args)
    captured = capsys.readouterr()
    assert_failed_cleanly(rc, captured.err, MENTIONS.get(case))
    assert captured.out == ""
    assert not out.exists()
    assert list(work.iterdir()) == []            # no temporary or stray folders beside -o
    assert not cache.exists()
    assert not (tmp_path / "default-cache").exists()
    assert listing(inputs.dir) == before         # inputs untouched


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
