"""Hostile inputs beyond tests/test_bad_input.py (issue 14, parts 2 and 3), one table per
class of defence: commands that would replace their own input, the destination checked
before any work, failed writes, bad calibration-cache entries, hostile YAML, absurd tensor
headers and paths, degenerate data, signals. Every refused case exits 2 with exactly one
stderr line naming the problem, and leaves nothing: no output folder, inputs unchanged,
TMPDIR empty (conftest's autouse fixture)."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from conftest import SAMPLE, SAMPLE_MODEL, VALID_TXT, Builder, listing, mlp_feeds, save, save_npz
from onnx import TensorProto, helper
from test_bad_input import Inputs, _external, _relocate

from sparsecc import cli, model_io
from sparsecc.data import Tokenizer
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import PassManager

REPO = Path(__file__).resolve().parent.parent


def one_error_line(rc: int, err: str, problem: str) -> str:
    """The run failed cleanly: exit 2, one stderr line (progress lines aside: none here) naming `problem`."""
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("sparsecc: error: "), err
    assert problem in lines[0], lines[0]
    return lines[0]


def compiled(inputs: Inputs, out: Path, *extra: str) -> Path:
    assert cli.main(["-q", *inputs.compile(None, "--no-cache", "-o", str(out), *extra)]) == 0
    return out


# 2. No command replaces what it reads -------------------------------------------------------------
def eval_into_its_model_folder(i: Inputs, work: Path):
    out = compiled(i, work / "out")
    return ["eval", str(out / "model.onnx"), "--ppl", str(i.npz), "-o", str(out)], work


def simulate_into_its_folder(i: Inputs, work: Path):
    out = compiled(i, work / "sim", "--target", "seneca")
    return ["simulate", str(out), "--text", str(i.npz), "-o", str(out)], work


def compile_into_the_model_folder(i: Inputs, work: Path):
    """The recorded reference would be the output itself: a later eval would compare it with itself."""
    return ["compile", str(i.model), "--calib", str(i.npz), "--no-cache", "-o", str(i.dir)], i.dir


def compile_over_a_compiled_model(i: Inputs, work: Path):
    out = compiled(i, work / "out")
    return ["compile", str(out / "model.onnx"), "--calib", str(i.npz), "--no-cache", "-o", str(out)], work


def compile_over_its_pipeline(i: Inputs, work: Path):
    out = compiled(i, work / "out")
    return ["compile", str(i.model), "--pipeline", str(out / "config.yaml"), "--no-cache", "-o", str(out)], work


def compile_over_its_calibration_data(i: Inputs, work: Path):
    out = compiled(i, work / "out")
    shutil.copy(i.npz, out / "calib.npz")
    return ["compile", str(i.model), "--calib", str(out / "calib.npz"), "--no-cache", "-o", str(out)], work


def compile_over_its_external_data(i: Inputs, work: Path):
    model = _external(onnx.load(str(i.model)), work / "out" / "ext.onnx")
    (work / "out" / "report.json").write_text("{}")   # a sparsecc folder: only the overlap stops it
    return ["compile", str(model), "--calib", str(i.npz), "--no-cache", "-o", str(work / "out")], work


def compile_into_its_cache(i: Inputs, work: Path):
    return ["compile", str(i.model), "--calib", str(i.npz), "--cache-dir", str(work / "c"), "-o", str(work / "c")], work


def compile_inside_its_calibration_folder(i: Inputs, work: Path):
    i.file("texts/a.txt", i.text.read_text())
    return i.text_compile("-o", str(i.dir / "texts" / "out"), text=i.dir / "texts"), i.dir


def export_over_its_source(i: Inputs, work: Path):
    i.file("hf/config.json", "{}")
    return ["export", str(i.dir / "hf"), "-o", str(i.dir / "hf")], i.dir


def sweep_over_its_models(i: Inputs, work: Path):
    out = work / "sweep"
    out.mkdir()
    shutil.copy(i.model, out / "m.onnx")
    sweep = i.file("sweep.yaml", f"models: {{m: {out / 'm.onnx'}}}\ndata: {{calib: {i.npz}}}\n"
                                 f"eval: {{ppl: {i.npz}}}\ngrid: {{sparsity: [0.3]}}\n")
    (out / "sweep.yaml").write_text(sweep.read_text())
    return ["sweep", str(sweep), "-o", str(out)], work


OVERLAPS = [eval_into_its_model_folder, simulate_into_its_folder, compile_into_the_model_folder,
            compile_over_a_compiled_model, compile_over_its_pipeline, compile_over_its_calibration_data,
            compile_over_its_external_data, compile_into_its_cache, compile_inside_its_calibration_folder,
            export_over_its_source, sweep_over_its_models]


@pytest.mark.parametrize("case", OVERLAPS, ids=[c.__name__ for c in OVERLAPS])
def test_no_command_replaces_what_it_reads(case, tmp_path, capfd):
    inputs = Inputs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    args, watched = case(inputs, work)
    before = listing(watched)
    capfd.readouterr()
    rc = cli.main(args)
    out, err = capfd.readouterr()
    line = one_error_line(rc, err, "which this command reads")
    assert "destroy its own input; choose another -o" in line and out == ""
    assert listing(watched) == before


def test_eval_refuses_a_model_compiled_as_its_own_reference(tmp_path, capfd):
    """An output made before this check (config.yaml naming the model itself as its source),
    or --reference naming the model: comparing it with itself would report 100% agreement."""
    inputs = Inputs(tmp_path)
    out = compiled(inputs, tmp_path / "out")
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(inputs.model), str((out / "model.onnx").resolve())))
    capfd.readouterr()
    rc = cli.main(["eval", str(out / "model.onnx"), "--ppl", str(inputs.npz)])
    one_error_line(rc, capfd.readouterr().err, "compiled into its own folder) the model itself as the reference")
    rc = cli.main(["eval", str(inputs.model), "--ppl", str(inputs.npz), "--reference", str(inputs.model)])
    one_error_line(rc, capfd.readouterr().err, "--reference names the model itself")


# 3. The destination, checked before any work ------------------------------------------------------
def _blocked(i: Inputs, monkeypatch):
    blocked = i.file("a-file", "not a folder")
    return {"empty": ("", "is the current folder"), "dot": (".", "is the current folder"),
            "parent": ("..", "is the current folder or holds it"),
            "under a file": (str(blocked / "out"), "is a file, not a folder"),
            "deep under a file": (str(blocked / "a" / "b"), "is a file, not a folder")}


@pytest.mark.parametrize("name", ["empty", "dot", "parent", "under a file", "deep under a file", "unwritable",
                                  "read-only"])
def test_destination_is_checked_before_any_work(name, tmp_path, monkeypatch, capfd):
    inputs = Inputs(tmp_path)
    started = []
    monkeypatch.setattr(PassManager, "run", lambda *a, **k: started.append(1) or pytest.fail("compile started"))
    if name in ("unwritable", "read-only"):   # root writes anywhere: the kernel's answer is simulated
        parent = tmp_path / "locked"
        parent.mkdir()
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, real=real: False if Path(p) == parent else real(p, mode))
        if name == "read-only":
            monkeypatch.setattr(model_io, "_read_only", lambda folder: True)
        out, problem = str(parent / "out"), ("read-only file system" if name == "read-only" else "permission denied")
    else:
        out, problem = _blocked(inputs, monkeypatch)[name]
    before = listing(tmp_path)
    capfd.readouterr()
    rc = cli.main(inputs.text_compile("-o", out, "--no-cache"))
    out_text, err = capfd.readouterr()
    one_error_line(rc, err, problem)
    assert "calibrat" not in err and not started       # no pass ran, no data was even read
    assert listing(tmp_path) == before


def _no_space(model, path):
    with open("/dev/full", "wb") as full:   # a real ENOSPC from the kernel
        full.write(b"\0" * (1 << 16))
        full.flush()


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capfd):
    inputs = Inputs(tmp_path)
    monkeypatch.setattr(model_io, "save_model", _no_space)
    work = tmp_path / "work"
    work.mkdir()
    rc = cli.main(inputs.compile(None, "--no-cache", "-o", str(work / "out")))
    err = capfd.readouterr().err.splitlines()[-1:]
    assert rc == 2 and err[0].startswith("sparsecc: error: cannot write ") and "no space left on the device" in err[0]
    assert list(work.iterdir()) == []


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """ulimit -f below the model's size: the write fails (Python ignores SIGXFSZ) with EFBIG."""
    inputs = Inputs(tmp_path)
    scratch, work = tmp_path / "scratch", tmp_path / "work"
    scratch.mkdir()
    work.mkdir()
    limit = inputs.model.stat().st_size // 2
    proc = subprocess.run([sys.executable, "-m", "sparsecc", *inputs.compile(None, "--no-cache", "-o", str(work / "out"))],
                          capture_output=True, text=True, env=os.environ | {"TMPDIR": str(scratch)},
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    last = proc.stderr.splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("sparsecc: error: cannot write") and "file-size limit (ulimit -f)" in last
    assert list(work.iterdir()) == [] and [p for p in scratch.iterdir() if p.name != ".ses"] == []


# 3. Calibration cache ------------------------------------------------------------------------------
SPOILERS = {
    "random bytes": lambda path: path.write_bytes(np.random.default_rng(0).bytes(500)),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "one byte flipped": lambda path: path.write_bytes((lambda b: b[:60] + bytes([b[60] ^ 0xFF]) + b[61:])(path.read_bytes())),
    "foreign arrays": lambda path: np.savez(path.with_suffix(""), h0=np.arange(3)) or path.with_suffix(".npz").replace(path),
    "negative counts": lambda path: np.savez(path.with_suffix(""), **{k: -v for k, v in np.load(path).items()})
    or path.with_suffix(".npz").replace(path),
    "empty": lambda path: path.write_bytes(b""),
}


@pytest.mark.parametrize("spoil", list(SPOILERS))
def test_bad_cache_entry_is_recomputed(spoil, tmp_path, capfd):
    inputs = Inputs(tmp_path)
    cache = tmp_path / "cache"
    args = inputs.compile(None, "--cache-dir", str(cache))
    assert cli.main(args + ["-o", str(tmp_path / "first")]) == 0
    entries = sorted(cache.glob("hist-*.npz"))
    assert entries
    for entry in entries:
        SPOILERS[spoil](entry)
    capfd.readouterr()
    assert cli.main(args + ["-o", str(tmp_path / "second")]) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == len(entries) and "Traceback" not in err, err
    assert all("unreadable (corrupt or truncated); recomputing them" in w for w in warnings)
    assert (tmp_path / "second" / "model.onnx").read_bytes() == (tmp_path / "first" / "model.onnx").read_bytes()
    assert cli.main(args + ["-o", str(tmp_path / "third")]) == 0      # the entries were written again, whole
    assert "warning" not in capfd.readouterr().err.lower()


def test_unusable_cache_folder_is_skipped_with_a_warning(tmp_path, capfd):
    inputs = Inputs(tmp_path)
    blocked = inputs.file("not-a-folder", "x")
    assert cli.main(inputs.compile(None, "--no-cache", "-o", str(tmp_path / "plain"))) == 0
    capfd.readouterr()
    assert cli.main(inputs.compile(None, "--cache-dir", str(blocked / "cache"), "-o", str(tmp_path / "out"))) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warnings and all("cannot use the calibration cache" in w for w in warnings) and "Traceback" not in err
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (tmp_path / "plain" / "model.onnx").read_bytes()
    assert blocked.read_text() == "x"


def test_bad_search_checkpoint_starts_afresh(tmp_path, capfd):
    inputs = Inputs(tmp_path)
    cache = tmp_path / "cache"
    args = inputs.compile(None, "--search", "allocate-sparsity", "--search-option", "step=0.1", "--cache-dir", str(cache))
    assert cli.main(args + ["-o", str(tmp_path / "first")]) == 0
    checkpoints = sorted(p for p in cache.glob("*.json"))
    assert checkpoints
    for path in checkpoints:
        path.write_text('{"levels": {"no such group": 0.5}, "hist')
    capfd.readouterr()
    assert cli.main(args + ["-o", str(tmp_path / "second")]) == 0
    err = capfd.readouterr().err
    assert "starting the search afresh" in err and "Traceback" not in err
    assert (tmp_path / "second" / "model.onnx").read_bytes() == (tmp_path / "first" / "model.onnx").read_bytes()


# 3. Hostile YAML -----------------------------------------------------------------------------------
def _laughs(levels: int = 9) -> str:
    text, previous = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n', "a"
    for name in "bcdefghijk"[: levels - 1]:
        text += f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
        previous = name
    return text + f"passes: [discover-sites]\ndata: {{windows: *{previous}}}\n"


YAMLS = {
    "billion laughs": (_laughs(), "expands to more than 100000 values"),
    "alias inside its anchor": ("passes: &p [discover-sites, *p]\n", "alias inside its own anchor"),
    "deep flow nesting": ("passes: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "deep block nesting": ("passes:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(700)), "nested too deeply"),
    "oversized": ("passes: [discover-sites]\n" + "#" * (2 << 20) + "\n", "more than the 1048576"),
    "huge value echoed": ("passes: [discover-sites]\ndata: {windows: [" + ", ".join(["12345678"] * 5000) + "]}\n",
                          "windows must be an integer"),
}


# in a sweep file, the huge value goes where a sweep echoes it (eval reads no such value of config.yaml)
SWEEP_ECHO = ("retries: [" + ", ".join(["12345678"] * 5000) + "]\n", "retries must be an integer 0 or more")
WHERE = [(name, where) for where in ("pipeline", "sweep", "compiled config") for name in YAMLS
         if (name, where) != ("huge value echoed", "compiled config")]


@pytest.mark.parametrize("name, where", WHERE, ids=[f"{w}-{n}" for n, w in WHERE])
def test_hostile_yaml(name, where, tmp_path, capfd):
    inputs = Inputs(tmp_path)
    text, problem = YAMLS[name]
    if (name, where) == ("huge value echoed", "sweep"):
        text, problem = f"models: {{m: {inputs.model}}}\neval: {{ppl: {inputs.npz}}}\n" + SWEEP_ECHO[0], SWEEP_ECHO[1]
    if where == "pipeline":
        args = ["compile", str(inputs.model), "--pipeline", str(inputs.file("p.yaml", text)), "-o", str(tmp_path / "o")]
    elif where == "sweep":
        args = ["sweep", str(inputs.file("s.yaml", text)), "-o", str(tmp_path / "o")]
    else:
        folder = inputs.dir / "compiled"
        folder.mkdir()
        shutil.copy(inputs.model, folder / "model.onnx")
        (folder / "config.yaml").write_text(text)
        args = ["eval", str(folder / "model.onnx"), "--ppl", str(inputs.npz)]
    started = time.monotonic()
    capfd.readouterr()
    rc = cli.main(args)
    line = one_error_line(rc, capfd.readouterr().err, problem)
    assert len(line) < 400 and time.monotonic() - started < 20   # a bounded excerpt, no hang
    assert not (tmp_path / "o").exists()


def test_deeply_nested_target_file(tmp_path, capfd):
    from test_bad_input import _target_compile

    inputs = Inputs(tmp_path)
    args = _target_compile(inputs, inputs.file("deep.toml", "a = " + "[" * 5000 + "]" * 5000 + "\n"))
    capfd.readouterr()
    rc = cli.main(args + ["--no-cache", "-o", str(tmp_path / "o")])
    lines = capfd.readouterr().err.splitlines()
    assert rc == 2 and lines[-1].startswith("sparsecc: error: target file ") and "nested too deeply" in lines[-1]
    assert all(ln.startswith(("[", "calibration data:")) for ln in lines[:-1]) and not (tmp_path / "o").exists()


# 3. Absurd tensor headers and paths -----------------------------------------------------------------
def huge_dims(i: Inputs):
    model = onnx.load(str(i.model))
    model.graph.initializer[0].dims[0] = 2**40
    return i.compile(save(model, i.dir / "huge.onnx")), "declares shape [1099511627776, 64]"


def huge_dims_typed_fields(i: Inputs):
    """Values in float_data, not raw_data: only the size a protobuf can hold bounds them."""
    model = onnx.load(str(i.model))
    w = model.graph.initializer[0]
    w.float_data.extend(onnx.numpy_helper.to_array(w).ravel().tolist())
    w.ClearField("raw_data")
    w.dims[0] = 2**40
    return i.compile(save(model, i.dir / "typed.onnx")), "at most 2 GiB (an inline tensor's protobuf limit)"


def huge_dims_external(i: Inputs):
    path = _external(onnx.load(str(i.model)), i.dir / "ext" / "model.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer[0].dims[1] = 2**40
    onnx.save(proto, str(path))
    return i.compile(path), "a corrupt tensor header"


def zero_width_weight(i: Inputs):
    b = Builder(7)
    y = b.op("MatMul", ["x", b.const("w", np.zeros((32, 0), np.float32))], name="fc")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])
    return i.compile(save(b.model([x], {"y": (y, ["n", 0])}), i.dir / "zero.onnx")), "has shape [32, 0]: no elements"


def nul_in_external_location(i: Inputs):
    path = _external(onnx.load(str(i.model)), i.dir / "ext" / "model.onnx")
    _relocate(path, "model.onnx.data\0.evil")
    return i.compile(path), "invalid external-data location ('model.onnx.data\\x00.evil')"


def external_data_is_the_model_itself(i: Inputs):
    path = _external(onnx.load(str(i.model)), i.dir / "ext" / "model.onnx")
    _relocate(path, "model.onnx")
    return i.compile(path), "reads its external data from the model file itself"


def newline_in_model_path(i: Inputs):
    folder = i.dir / "two\nlines"
    return i.compile(folder / "missing.onnx"), "model file not found: "


def newline_in_output_path(i: Inputs):
    blocked = i.file("file\rwith\x1b[31mcontrols", "x")
    return i.compile(None, "-o", str(blocked / "out")), "controls is a file, not a folder"


HEADERS = [huge_dims, huge_dims_typed_fields, huge_dims_external, zero_width_weight, nul_in_external_location,
           external_data_is_the_model_itself, newline_in_model_path, newline_in_output_path]


# 3. Degenerate data ----------------------------------------------------------------------------------
def text_with_nul_bytes(i: Inputs):
    return i.text_compile(text=i.file("nul.txt", i.text.read_text()[:5000] + "\0" * 100)), "holds NUL bytes"


def binary_that_decodes(i: Inputs):
    data = bytes(np.random.default_rng(4).integers(1, 32, 4000, dtype=np.uint8))   # valid UTF-8, all controls
    return i.text_compile(text=i.file("controls.txt", data)), "control characters in 4000: binary data, not text"


def scalar_in_npz(i: Inputs):
    np.savez(i.dir / "scalar.npz", x=np.float32(1.0))
    return i.compile(calib=i.dir / "scalar.npz"), "'x' is a 0-d array"


def tokenizer_without_its_unknown_token(i: Inputs):
    spec = json.loads((SAMPLE / "tokenizer.json").read_text())
    spec["model"]["unk_token"] = "<unk>"          # named, but not in its vocabulary
    return i.text_compile(tokenizer=i.file("tok/tokenizer.json", json.dumps(spec))), "names '<unk>' as its unknown token"


def wordpiece_without_its_unknown_token(i: Inputs):
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": {"the": 0, "a": 1}}}
    return i.text_compile(tokenizer=i.file("wp.json", json.dumps(spec))), "names '[UNK]' as its unknown token"


DEGENERATE = [text_with_nul_bytes, binary_that_decodes, scalar_in_npz, tokenizer_without_its_unknown_token,
              wordpiece_without_its_unknown_token]


@pytest.mark.parametrize("case", HEADERS + DEGENERATE, ids=[c.__name__ for c in HEADERS + DEGENERATE])
def test_absurd_headers_paths_and_data(case, tmp_path, capfd):
    inputs = Inputs(tmp_path)
    args, problem = case(inputs)
    work = tmp_path / "work"
    work.mkdir()
    if "-o" not in args:
        args += ["-o", str(work / "out")]
    before = listing(inputs.dir)
    capfd.readouterr()
    rc = cli.main(args + ["--no-cache"])
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert rc == 2 and lines and lines[-1].startswith("sparsecc: error: "), err
    assert problem in lines[-1], lines[-1]
    assert all(ln.startswith("[") for ln in lines[:-1]), err     # before it, progress lines ([1/3] pass) only
    assert list(work.iterdir()) == [] and listing(inputs.dir) == before


def test_gguf_tokenizer_error_names_a_real_extra(tmp_path, monkeypatch):
    import tomllib

    monkeypatch.setitem(sys.modules, "transformers", None)    # not installed
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SparseccError) as raised:
        Tokenizer(gguf)
    extra = str(raised.value).split("sparsecc[")[1].split("]")[0]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras and any(dep.startswith("gguf") for dep in extras[extra])


# 3. Signals ------------------------------------------------------------------------------------------
def _start_compile(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    work, scratch = tmp_path / "work", tmp_path / "scratch"
    work.mkdir()
    scratch.mkdir()
    text = tmp_path / "valid-start.txt"    # enough for 16 windows, quick to tokenize
    with open(VALID_TXT, encoding="utf-8") as f:
        text.write_text(f.read(100_000), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsecc", "compile", str(SAMPLE_MODEL), "--calib", str(text),
         "--tokenizer", str(SAMPLE), "--seq-len", "64", "--windows", "16", "--sparsity", "0.5",
         "--search", "allocate-sparsity", "--search-option", "step=0.02", "--no-cache", "-o", str(work / "out")],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ | {"TMPDIR": str(scratch)})
    for line in proc.stderr:   # wait until the search is under way (a model copy in TMPDIR)
        if "allocate-sparsity" in line:
            break
    time.sleep(1.0)
    return proc, work, scratch


def _left(work: Path, scratch: Path) -> list[str]:
    return [p.name for p in work.iterdir()] + [p.name for p in scratch.iterdir() if p.name != ".ses"]


def test_sighup_leaves_nothing_behind(tmp_path):
    proc, work, scratch = _start_compile(tmp_path)
    proc.send_signal(signal.SIGHUP)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGHUP, err
    assert "Traceback" not in err and _left(work, scratch) == []


def test_repeated_ctrl_c_prints_one_line_and_leaves_nothing(tmp_path):
    proc, work, scratch = _start_compile(tmp_path)
    for _ in range(5):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.splitlines()[-1] == "sparsecc: interrupted; no output written"
    assert _left(work, scratch) == []


def test_ctrl_c_during_start_up_prints_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "sparsecc", "list", "passes"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:   # -X importtime: a line per import; stop in the middle of the heavy ones
        if "numpy" in line:
            break
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("import time:")]
    # one line: "while starting" before the command runs; the heavy imports may come inside it (lazily)
    assert len(lines) == 1 and re.fullmatch(r"sparsecc: interrupted( while starting)?; no output written", lines[0]), err
