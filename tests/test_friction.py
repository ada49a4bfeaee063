"""What a newcomer met (issue 14, part 4): a compile that would change nothing, calibration on
a test split, compile output folders as models, the default window count, a slow --version,
mistyped flags."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, SAMPLE_MODEL, VALID_TXT, listing, mlp_feeds, save_npz

from sparsecc import cli, pipeline
from sparsecc.data import TextWindows, named_like_test_split


def run(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("[")]   # pass progress lines
    assert len(lines) == 1 and lines[0].startswith("sparsecc: error: "), err
    return lines[0]


# -- a compile that would change nothing ------------------------------------------------------

def test_compile_without_data_is_refused_and_writes_nothing(tmp_path, mlp_path, capsys):
    rc, out, err = run(capsys, "compile", mlp_path, "-o", tmp_path / "out")
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert "nothing to compile: no pass changed the model (ran discover-sites)" in line and "--calib" in line
    assert not (tmp_path / "out").exists()


def test_pipelines_that_need_no_data_still_compile(tmp_path, mlp_path, capsys):
    # partition only (seneca) and weight quantization change the model without calibration data
    rc, _, err = run(capsys, "compile", mlp_path, "--target", "seneca", "-o", tmp_path / "seneca")
    assert rc == 0, err
    report = json.loads((tmp_path / "seneca" / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["discover-sites", "partition"] and report["data"] is None
    assert "Calibration data: none" in (tmp_path / "seneca" / "report.md").read_text()
    rc, _, err = run(capsys, "compile", mlp_path, "--quant", "w8", "-o", tmp_path / "w8")
    assert rc == 0, err


# -- calibration files: recorded, and no test split ---------------------------------------------

def small_corpus(root: Path, names: list[str]) -> Path:
    text = VALID_TXT.read_text(encoding="utf-8")[:6000]
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text[i * 2000:(i + 1) * 2000], encoding="utf-8")
    return root


def test_test_split_names():
    root = Path("/data/tests/corpus")   # folders above the source do not count
    yes = ["test.txt", "wiki.test.tokens.txt", "test-00001.txt", "en_test.txt", "TEST.txt", "test/part.txt",
           "split_tests/a.txt"]
    no = ["valid.txt", "latest.txt", "contest.txt", "attestation.txt", "train/a.txt", "testimony.txt"]
    assert [named_like_test_split(root / n, root) for n in yes] == [True] * len(yes)
    assert [named_like_test_split(root / n, root) for n in no] == [False] * len(no)
    assert named_like_test_split(root / "test.txt", root / "test.txt")   # a file given itself


def test_calibration_on_a_test_split_is_refused(tmp_path, capsys):
    corpus = small_corpus(tmp_path / "data", ["valid.txt", "wikitext/test.txt"])
    args = ["compile", SAMPLE_MODEL, "--calib", corpus, "--tokenizer", SAMPLE, "--seq-len", "16", "--windows", "2",
            "--refine", "0"]
    rc, _, err = run(capsys, *args, "-o", tmp_path / "out")
    assert rc == 2 and not (tmp_path / "out").exists()
    line = one_error_line(err)
    assert f"includes {corpus / 'wikitext' / 'test.txt'}, named like a test split" in line
    assert "--allow-test-split" in line

    rc, _, err = run(capsys, *args, "--allow-test-split", "-o", tmp_path / "out")
    assert rc == 0, err
    files = [str(corpus / "valid.txt"), str(corpus / "wikitext" / "test.txt")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["files"] == files and report["data"]["windows"] == 2
    assert f"2 files: {', '.join(files)}" in (tmp_path / "out" / "report.md").read_text()
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["data"]["allow_test_split"] is True
    # config.yaml reproduces the run, opt-out included
    rc, _, err = run(capsys, "compile", SAMPLE_MODEL, "--pipeline", tmp_path / "out" / "config.yaml", "-o", tmp_path / "again")
    assert rc == 0, err
    assert listing(tmp_path / "again") == listing(tmp_path / "out") | {"timings.json": listing(tmp_path / "again")["timings.json"]}


def test_files_read_from_a_folder_are_recorded(tmp_path):
    corpus = small_corpus(tmp_path / "data", ["b.txt", "a/x.txt", "notes.md"])
    source = TextWindows(corpus, SAMPLE, seq_len=16, limit=3)
    assert source.describe()["files"] == [str(corpus / "a" / "x.txt"), str(corpus / "b.txt")]
    assert source.test_split_files() == []


# -- a compile output folder wherever a model is taken -------------------------------------------

def test_compile_output_folder_is_a_model_everywhere(tmp_path, mlp_path, mlp_npz, capsys):
    out = tmp_path / "out"
    assert run(capsys, "compile", mlp_path, "--calib", mlp_npz, "--sparsity", "0.4", "-o", out)[0] == 0
    rc, _, err = run(capsys, "eval", out, "--ppl", mlp_npz, "--reference", mlp_path.parent)
    assert rc == 2 and f"{mlp_path.parent} is a folder without model.onnx" in one_error_line(err)   # mlp.onnx only
    by_folder = run(capsys, "eval", out, "--ppl", mlp_npz, "--json")
    by_file = run(capsys, "eval", out / "model.onnx", "--ppl", mlp_npz, "--json")
    assert by_folder[0] == by_file[0] == 0
    assert json.loads(by_folder[1]) == json.loads(by_file[1])
    assert json.loads(by_folder[1])["reference"] == str(mlp_path.resolve())   # from the folder's config.yaml

    # compile's input and a sweep's models take the folder too
    rc, _, err = run(capsys, "compile", out, "--calib", mlp_npz, "--sparsity", "0.5", "-o", tmp_path / "again")
    assert rc == 0, err
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["source"]["model"] == str((out / "model.onnx").resolve())
    from sparsecc.sweep import _models

    assert _models({"c": str(out)}, "sweep.yaml") == {"c": str((out / "model.onnx").resolve())}
    assert run(capsys, "inspect", out)[1] == run(capsys, "inspect", out / "model.onnx")[1].replace(
        f"path={out / 'model.onnx'}", f"path={out}")


def test_simulate_takes_the_folder_or_its_model(tmp_path, mlp_path, mlp_npz, capsys):
    out = tmp_path / "seneca"
    assert run(capsys, "compile", mlp_path, "--calib", mlp_npz, "--target", "seneca", "-o", out)[0] == 0
    by_folder = run(capsys, "simulate", out, "--text", mlp_npz, "--no-compare", "-o", tmp_path / "s1", "--json")
    by_file = run(capsys, "simulate", out / "model.onnx", "--text", mlp_npz, "--no-compare", "-o", tmp_path / "s2", "--json")
    assert by_folder[0] == by_file[0] == 0, by_file[2]
    assert (tmp_path / "s1" / "report.json").read_bytes() == (tmp_path / "s2" / "report.json").read_bytes()


# -- the default window count --------------------------------------------------------------------

def test_compile_takes_calib_windows_by_default(tmp_path, mlp_path, capsys):
    many = save_npz(mlp_feeds(pipeline.CALIB_WINDOWS + 72, rows=4), tmp_path / "many.npz")
    rc, _, err = run(capsys, "compile", mlp_path, "--calib", many, "-o", tmp_path / "out")
    assert rc == 0, err
    used = f"calibration data: {pipeline.CALIB_WINDOWS} of {pipeline.CALIB_WINDOWS + 72} samples of {many}"
    assert used in err                                                         # the progress line
    assert f"Calibration data: {used.split(': ', 1)[1]}" in (tmp_path / "out" / "report.md").read_text()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"] == {"kind": "npz", "path": str(many), "samples": pipeline.CALIB_WINDOWS,
                              "samples_available": pipeline.CALIB_WINDOWS + 72}
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["data"]["windows"] == pipeline.CALIB_WINDOWS                  # so config.yaml reproduces it
    rc, _, err = run(capsys, "compile", mlp_path, "--calib", many, "--windows", "1000", "-o", tmp_path / "all")
    assert rc == 0 and json.loads((tmp_path / "all" / "report.json").read_text())["data"]["samples"] == 200


# -- fast answers, suggestions ---------------------------------------------------------------------

HEAVY = ("torch", "onnxruntime", "onnx", "onnx_ir", "matplotlib", "numpy", "yaml", "tokenizers")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["compile", "--help"], ["eval", "--help"],
                                  ["compile", "m.onnx", "-o", "x", "--calb", "v.txt"], ["compil"]])
def test_quick_answers_import_nothing_heavy(argv):
    code = ("import sys\nfrom sparsecc.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv, hint", [
    (["compile", "m.onnx", "-o", "x", "--calb", "v.txt"], "unrecognized arguments: --calb v.txt; did you mean --calib?"),
    (["eval", "m.onnx", "--pll=t.txt", "--windws", "3"], "unrecognized arguments: --pll=t.txt --windws 3; did you mean --ppl, --windows?"),
    (["compil", "m.onnx"], "invalid choice: 'compil' (choose from"),
    (["compil", "m.onnx"], "did you mean 'compile'?"),
    (["compile", "m.onnx", "-o", "x", "--search", "greedy"], "did you mean 'greedy-blocks'?"),
    (["list", "pases"], "did you mean 'passes'?"),
    (["--verion"], "did you mean --version?"),
    (["compile", "m.onnx", "--ot", "x"], "the following arguments are required: -o/--out; did you mean --out?"),
])
def test_mistyped_flags_get_a_suggestion(capsys, argv, hint):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsecc: error: ") and hint in err


def test_no_suggestion_when_nothing_is_close(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compile", "m.onnx", "-o", "x", "--zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err
