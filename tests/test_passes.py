"""The pass framework: options, preconditions, ids, pipeline files, IR dumps."""
from __future__ import annotations

import re

import pytest
import yaml
from conftest import mlp_feeds, mlp_model, to_ir

import sparsecc
from sparsecc import cli, passes
from sparsecc import config as cfg
from sparsecc import pipeline as pipelines
from sparsecc.data import IterableFeeds
from sparsecc.errors import PreconditionError, SparseccError
from sparsecc.pass_manager import Context, Pass, PassManager, PassResult, model_facts


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(SparseccError) as err:
        passes.get("insert-thresholds")(per_consumers=True)
    assert "per_consumers" in str(err.value)
    assert "valid options: per_consumer, include_head" in str(err.value)
    with pytest.raises(SparseccError, match="valid options: sparsity, mode, refine"):
        passes.get("calibrate-thresholds")(target=0.5)
    with pytest.raises(SparseccError, match="valid options: none"):
        passes.get("discover-sites")(verbose=True)


def test_unknown_option_in_a_pipeline_document():
    spec = {"passes": ["discover-sites", {"pass": "insert-thresholds", "head": True}]}
    with pytest.raises(SparseccError, match=r"unknown option 'head'; valid options: per_consumer, include_head"):
        pipelines.from_spec(spec)


def test_bad_option_values():
    with pytest.raises(SparseccError, match="mode must be one of mac-weighted, uniform"):
        passes.get("calibrate-thresholds")(mode="balanced")
    with pytest.raises(SparseccError, match=r"sparsity must be in \[0, 1\)"):
        passes.get("calibrate-thresholds")(sparsity=1.0)
    with pytest.raises(SparseccError, match="refine"):
        passes.get("calibrate-thresholds")(refine=-1)
    with pytest.raises(SparseccError, match="per_consumer must be bool"):
        passes.get("insert-thresholds")(per_consumer="yes please")
    # Plain strings from YAML or flags are coerced.
    assert passes.get("calibrate-thresholds")(sparsity="0.25").config.sparsity == 0.25
    assert passes.get("insert-thresholds")(include_head="true").config.include_head is True


def test_unknown_pass_name():
    with pytest.raises(SparseccError, match="unknown pass 'insert-threshold'; known passes: allocate-sparsity, calibrate-thresholds"):
        passes.get("insert-threshold")


def test_calibrate_before_insert_is_a_precondition_error():
    model = to_ir(mlp_model())
    manager = PassManager([passes.get("discover-sites")(), passes.get("calibrate-thresholds")()])
    with pytest.raises(PreconditionError, match="pipeline order: calibrate-thresholds needs Threshold ops, which no pass "
                                                "before it provides; put insert-thresholds before it"):
        manager.run(model, Context(calibration=IterableFeeds(mlp_feeds(2))))
    # And without data, the precondition names the missing data.
    with pytest.raises(PreconditionError, match="needs calibration data"):
        PassManager(sparsecc.default_pipeline()).run(to_ir(mlp_model()), Context())


class Spy(Pass):
    """Records that it ran."""

    name = "spy"
    ran: list = []

    def run(self, model, ctx):
        Spy.ran.append(self.id)
        return PassResult({}, changed=False)


@pytest.mark.parametrize("later, context, message", [
    (["calibrate-thresholds", "weight-scores"], "data",
     "pipeline order: weight-scores must run before thresholds set to a sparsity (by calibrate-thresholds); "
     "move it before calibrate-thresholds"),
    (["distill"], "data", "pipeline order: distill needs thresholds set to a sparsity, which no pass before it "
                          "provides; put calibrate-thresholds or allocate-sparsity (or another that does) before it"),
    (["calibrate-thresholds", "quantize-activations", "distill"], "data",
     "pipeline order: distill must run before int8 events (QuantizeLinear on activations) (by quantize-activations)"),
    (["calibrate-thresholds"], None, "calibrate-thresholds needs calibration data"),
    (["quantize-activations"], None, "quantize-activations needs calibration data"),
])
def test_a_wrong_pipeline_is_refused_before_any_pass_runs(later, context, message):
    """The whole pipeline is checked first: the pass at its head (a spy) never runs."""
    Spy.ran = []
    pipeline = [Spy(), passes.get("insert-thresholds")()] + [passes.get(name)() for name in later]
    ctx = Context(calibration=IterableFeeds(mlp_feeds(2)) if context else None)
    with pytest.raises(PreconditionError, match=re.escape(message)):
        PassManager(pipeline).run(to_ir(mlp_model()), ctx)
    assert Spy.ran == []


def test_the_input_model_provides_facts_too(mlp_path, mlp_npz, tmp_path):
    """A compiled model already has thresholds and levels: weight-scores after them is refused
    with the fix; calibrate-thresholds alone on it needs no insert-thresholds."""
    sparsecc.compile_model(mlp_path, sparsecc.default_pipeline(sparsity=0.5), sparsecc.data_source(str(mlp_npz)),
                           out=tmp_path / "a")
    compiled = sparsecc.compiler.model_io.load_model(tmp_path / "a" / "model.onnx")
    assert model_facts(compiled) == {"thresholds", "levels"} and model_facts(to_ir(mlp_model())) == set()
    with pytest.raises(PreconditionError, match="weight-scores must run before thresholds set to a sparsity and the "
                                                "model's are set already"):
        PassManager([passes.get("weight-scores")()]).run(compiled, Context())
    again = PassManager([passes.get("calibrate-thresholds")(sparsity=0.3)]).run(
        compiled, Context(calibration=sparsecc.data_source(str(mlp_npz))))
    assert again[0].details["target"] == 0.3


def test_a_pass_returns_a_pass_result():
    class Old(Pass):
        name = "old"

        def run(self, model, ctx):
            return {"changed": True}

    with pytest.raises(SparseccError, match=r"pass old returned a dict: a pass's run returns a "
                                            r"sparsecc.pass_manager.PassResult\(details, changed\)"):
        PassManager([Old()]).run(to_ir(mlp_model()), Context())


def test_option_ranges_are_declared_with_the_option():
    """One interval per option, checked from every way a config is made (keywords, YAML strings,
    a config object), shown in help, docs and the JSON schema; NaN lies in no interval."""
    calibrate = passes.get("calibrate-thresholds")
    for bad in (1.0, -0.1, float("nan"), "1.5"):
        with pytest.raises(SparseccError, match=r"calibrate-thresholds: sparsity must be in \[0, 1\)"):
            calibrate(sparsity=bad)
    with pytest.raises(SparseccError, match=r"calibrate-thresholds: refine must be in \[0, 100\] \(got -1\)"):
        calibrate(config=calibrate.Config(refine=-1))
    with pytest.raises(SparseccError, match=r"distill: lr must be greater than 0 \(got 0.0\)"):
        passes.get("distill")(lr=0)
    with pytest.raises(SparseccError, match=r"steps must be at least 1 \(got 0\)"):
        passes.get("finetune-bands")(steps=0)
    assert calibrate(sparsity=0.0).config.sparsity == 0.0    # closed end
    info = {f.name: f for f in cfg.fields(calibrate.Config)}
    assert str(info["sparsity"].within) == "[0, 1)" and info["sparsity"].kind() == "float in [0, 1)"
    schema = cfg.schema(calibrate.Config)["properties"]["sparsity"]
    assert (schema["minimum"], schema["exclusiveMaximum"]) == (0.0, 1.0)
    compile_help = cli.build_parser()._subparsers._group_actions[0].choices["compile"].format_help()
    assert "(in [0, 1), default 0.5)" in " ".join(compile_help.split())


def test_calibrate_before_insert_through_compile(mlp_path, tmp_path):
    pipeline = [passes.get("calibrate-thresholds")(), passes.get("insert-thresholds")()]
    with pytest.raises(PreconditionError):
        sparsecc.compile_model(mlp_path, pipeline, mlp_feeds(2), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_pass_ids_are_rejected():
    discover = passes.get("discover-sites")
    with pytest.raises(SparseccError, match="two passes with id 'discover-sites'"):
        PassManager([discover(), discover()])
    with pytest.raises(SparseccError, match="two passes with id 'x'"):
        PassManager([discover(id="x"), passes.get("insert-thresholds")(id="x")])
    spec = {"passes": [{"pass": "discover-sites", "id": "a"}, {"pass": "discover-sites", "id": "a"}]}
    with pytest.raises(SparseccError, match="two passes with id 'a'"):
        PassManager(pipelines.from_spec(spec)[0])
    # Distinct ids let one pass run twice.
    manager = PassManager([discover(), discover(id="discover-again")])
    reports = manager.run(to_ir(mlp_model()), Context())
    assert [r.id for r in reports] == ["discover-sites", "discover-again"]
    assert reports[0].details == reports[1].details


def test_pass_reports():
    model = to_ir(mlp_model())
    reports = PassManager(sparsecc.default_pipeline(sparsity=0.5)).run(model, Context(calibration=IterableFeeds(mlp_feeds(4))))
    discover, insert, calibrate = (r.to_dict() for r in reports)
    assert discover["changed"] is False and discover["details"]["sites"] == 6
    assert discover["details"]["groups"] == 5 and discover["details"]["natural"] == 1
    assert discover["details"]["macs_per_token"] == {"all": 2048 * 3 + 1536 * 2 + 320, "body": 2048 * 3 + 1536 * 2}
    assert insert["changed"] is True and insert["details"]["thresholds"] == 3 and insert["details"]["sites"] == 4
    assert insert["details"]["skipped"]["natural"] == ["out"] and insert["details"]["skipped"]["head"] == ["head"]
    assert calibrate["config"] == {"sparsity": 0.5, "mode": "mac-weighted", "refine": 1, "refine_every": 4}
    # Running insert-thresholds again adds nothing.
    again = PassManager([passes.get("insert-thresholds")()]).run(model, Context())[0]
    assert again.changed is False and again.details["thresholds"] == 0
    assert len(again.details["skipped"]["already_thresholded"]) == 4


def test_per_consumer_gives_each_site_its_threshold():
    model = to_ir(mlp_model())
    report = passes.get("insert-thresholds")(per_consumer=True).run(model, Context()).details
    assert report["thresholds"] == 4 and report["sites"] == 4


def test_pipeline_document_round_trip():
    pipeline = [passes.get("discover-sites")(), passes.get("insert-thresholds")(per_consumer=True),
                passes.get("calibrate-thresholds")(id="cal-30", sparsity=0.3, mode="uniform", refine=2)]
    data = {"calib": "/data/valid.txt", "tokenizer": "/tok", "seq_len": 64, "windows": 8}
    text = pipelines.dump(pipelines.to_spec(pipeline, data))
    parsed = yaml.safe_load(text)
    assert parsed["schema"] == pipelines.SCHEMA
    back, back_data = pipelines.from_spec(parsed)
    assert back_data == data
    assert [(p.name, p.id, p.config) for p in back] == [(p.name, p.id, p.config) for p in pipeline]
    assert pipelines.dump(pipelines.to_spec(back, back_data)) == text


def _compile_cli(model, npz, out, *extra, cache=None):
    args = ["compile", str(model), "--calib", str(npz), "-o", str(out), *extra]
    args += ["--cache-dir", str(cache)] if cache else ["--no-cache"]
    return cli.main(args)


def test_config_yaml_reproduces_the_run(mlp_path, mlp_npz, tmp_path, capsys, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    assert _compile_cli(mlp_path, mlp_npz, first, "--sparsity", "0.35", "--mode", "uniform", "--per-consumer",
                        "--refine", "0", "--windows", "6", cache=tmp_path / "cache") == 0
    config = yaml.safe_load((first / "config.yaml").read_text())
    assert config["passes"][1] == {"pass": "insert-thresholds", "per_consumer": True, "include_head": False}
    assert config["passes"][2] == {"pass": "calibrate-thresholds", "sparsity": 0.35, "mode": "uniform", "refine": 0,
                                   "refine_every": 4}
    assert config["data"]["windows"] == 6
    # Given back with --pipeline (no pass flags, no --calib: all from the file), from another cwd.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["compile", str(mlp_path), "--pipeline", str(first / "config.yaml"), "-o", str(second),
                     "--no-cache"]) == 0
    for name in ("model.onnx", "report.json", "report.md", "config.yaml"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # A different option really gives a different model (the comparison above can fail).
    third = tmp_path / "third"
    assert _compile_cli(mlp_path, mlp_npz, third, "--sparsity", "0.36", "--mode", "uniform", "--per-consumer",
                        "--refine", "0", "--windows", "6") == 0
    assert (first / "model.onnx").read_bytes() != (third / "model.onnx").read_bytes()


def test_pipeline_flag_conflicts_with_pass_flags(mlp_path, mlp_npz, tmp_path, capsys):
    spec = tmp_path / "p.yaml"
    spec.write_text(pipelines.dump(pipelines.to_spec(sparsecc.default_pipeline())))
    rc = _compile_cli(mlp_path, mlp_npz, tmp_path / "out", "--pipeline", str(spec), "--sparsity", "0.2")
    assert rc == 2
    assert "--sparsity conflicts with --pipeline" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dump_after_writes_the_ir(mlp_path, mlp_npz, tmp_path, capsys):
    out = tmp_path / "out"
    assert _compile_cli(mlp_path, mlp_npz, out, "--dump-after", "insert-thresholds", "--dump-after", "discover-sites") == 0
    dumps = tmp_path / "out.dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["after-discover-sites.txt", "after-insert-thresholds.txt"]
    inserted = (dumps / "after-insert-thresholds.txt").read_text()
    assert "Threshold" in inserted and "sparsecc_threshold_0" in inserted
    assert "Threshold" not in (dumps / "after-discover-sites.txt").read_text()
    assert "w_gate" in inserted
    # An unknown pass name is an error, and nothing is written.
    capsys.readouterr()
    assert _compile_cli(mlp_path, mlp_npz, tmp_path / "other", "--dump-after", "nope") == 2
    assert "--dump-after 'nope' names no pass" in capsys.readouterr().err
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.dumps").exists()
