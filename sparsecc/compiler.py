"""The two jobs behind the CLI, callable from Python: compile a model, evaluate one."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from sparsecc import __version__, model_io, pipeline as pipelines
from sparsecc import report as reports, report_page
from sparsecc.data import FeedSource, NpzFeeds, TextWindows, as_feed_source
from sparsecc.errors import SparseccError
from sparsecc.pass_manager import Context, Pass, PassManager
from sparsecc.progress import log
from sparsecc.sites import analyze

CONFIG = "config.yaml"


def data_source(calib: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None,
                seq_len: int = 256, windows: int | None = None, samples: int = 0, model: str | os.PathLike | None = None,
                sample_temperature: float = 1.0, device: str = "auto", cache_dir: Path | None = None) -> FeedSource | None:
    """Feeds from a text file/folder (with a tokenizer) or an .npz of feeds; with `samples`,
    plus that many windows sampled from `model` itself (sparsecc.sampling), each started with
    the tokenizer's BOS."""
    source = None
    if calib is not None:
        source = NpzFeeds(calib, limit=windows) if str(calib).endswith(".npz") else \
            TextWindows(calib, tokenizer, seq_len=seq_len, limit=windows)
    if not samples:
        return source
    from sparsecc.data import MixedFeeds, Tokenizer
    from sparsecc.sampling import SampledWindows

    if tokenizer is None:
        raise SparseccError("sampled calibration windows start with the tokenizer's BOS token: pass --tokenizer")
    bos = (source.tokenizer if isinstance(source, TextWindows) else Tokenizer(tokenizer)).bos_id
    if bos is None:
        raise SparseccError(f"the tokenizer {tokenizer} adds no BOS token to start sampled windows with; "
                            "use --calib text only (drop --calib-samples)")
    sampled = SampledWindows(model, samples, seq_len, bos, temperature=sample_temperature, device=device,
                             cache_dir=cache_dir)
    return sampled if source is None else MixedFeeds([source, sampled])


def resolved_data(data: dict, overrides: dict | None = None) -> dict:
    """Data settings as config.yaml records them: `overrides` (flags) over `data` (a pipeline
    file's), None dropped, paths absolute (so the file works from any folder), seq_len set,
    and with calibration data its window count (pipeline.CALIB_WINDOWS unless given), in DATA_KEYS order."""
    data = {k: v for k, v in data.items() if v is not None}
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    for key in ("calib", "tokenizer"):
        if key in data:
            data[key] = str(Path(data[key]).resolve())
    data.setdefault("seq_len", 256)
    if "calib" in data:
        data.setdefault("windows", pipelines.CALIB_WINDOWS)
    return {k: data[k] for k in pipelines.DATA_KEYS if k in data}   # one order, however they were given


@dataclasses.dataclass
class CompileResult:
    model: ir.Model
    report: dict[str, Any]
    timings: dict[str, float]

    def model_as(self, form: str):
        """The compiled model as an "ir" (copy), "onnx" (ModelProto) or "graphsurgeon" (Graph) model."""
        from sparsecc.graph_forms import to_form

        return to_form(self.model, form)


def compile_model(model_path: Any, passes: list[Pass], calibration: Any = None,
                  out: str | os.PathLike | None = None, target: str = "ort", data: dict | None = None,
                  cache_dir: Path | None = None, dump_after: tuple[str, ...] = (), device: str = "auto",
                  allow_test_split: bool = False) -> CompileResult:
    """Run `passes` on the model at `model_path` (a path: a file or a compile output folder; or an
    onnx.ModelProto, onnx_ir.Model or onnx_graphsurgeon.Graph, which is left unchanged; see
    `CompileResult.model_as`); with `out`, write the model, reports and the resolved configuration
    there atomically. `calibration`: a FeedSource (see `data_source`), any iterable of feed dicts,
    or an ONNX Runtime CalibrationDataReader; a file of it named like a test split is refused
    unless `allow_test_split`. `device`: where the PyTorch-based passes run (auto, cpu, cuda).
    Refused when no pass changes the model and the backend writes nothing of its own (the
    output would be the input as it is)."""
    from sparsecc import backends

    from sparsecc.graph_forms import describe, form_of, to_ir

    calibration = as_feed_source(calibration)
    tests = calibration.test_split_files() if calibration is not None and not allow_test_split else []
    if tests:
        raise SparseccError(f"the calibration data includes {tests[0]}, named like a test split (calibrating on "
                            "the data you evaluate on hides what sparsity costs); point --calib at training or "
                            "validation text only, or pass --allow-test-split if it is meant")
    if form_of(model_path) == "path":
        model_path = model_io.model_file(model_path).resolve()
    source = describe(model_path)
    if out is not None:  # fail before the expensive part; never over what this compile reads
        inputs = model_io.input_files(model_path) if form_of(model_path) == "path" else []
        model_io.check_output_dir(Path(out), [*inputs, *reads(calibration, cache_dir)])
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise SparseccError(f"cache path {cache_dir} is a file; pass a folder with --cache-dir or use --no-cache")
    backend = backends.get(target)
    from sparsecc import passes as registry

    present = {p.name for p in passes}
    passes = list(passes) + [registry.get(name)() for name in backend.requires if name not in present]
    model = to_ir(model_path)
    if "fold-qdq" not in present and any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
        passes.insert(0, registry.get("fold-qdq")())   # an already-quantized (QDQ) model: its form first
    if calibration is not None:
        log(f"calibration data: {reports.data_summary(calibration.describe())}")
    ctx = Context(calibration=calibration, cache_dir=cache_dir, device=device)
    manager = PassManager(passes, dump_after=dump_after,
                          dump_dir=Path(out).with_name(Path(out).name + ".dumps") if out else None)
    pass_reports = manager.run(model, ctx)
    lowers = type(backend).lower is not backends.base.Backend.lower   # writes artifacts of its own (a plugin's stats, seneca's program)
    if not lowers and not any(r.changed for r in pass_reports):
        raise SparseccError(f"nothing to compile: no pass changed the model (ran {', '.join(r.id for r in pass_reports)}), "
                            "so the output would be the input as it is; give calibration data (--calib; text needs "
                            "--tokenizer) to insert and calibrate thresholds, --quant w8 or w4 to quantize the "
                            "weights, or --target seneca to partition it")
    declined = backend.declines(model)
    if declined:
        log(f"{target}: declined {len(declined)} node(s), listed in the report: "
            + "; ".join(f"{node}: {reason}" for node, reason in sorted(declined.items())[:3])
            + (" ..." if len(declined) > 3 else ""))
    spec = pipelines.to_spec(passes, data) | {"source": source, "sparsecc": __version__}
    report = {
        "schema": reports.SCHEMA, "kind": "compile", "sparsecc": __version__,
        "source": {"model": source},
        "target": {"backend": target, "declined": declined},
        "data": calibration.describe() if calibration is not None else None,
        "passes": [r.to_dict() for r in pass_reports],
        "sites": _site_rows(model),
    }
    timings = {r.id: round(r.seconds, 3) for r in pass_reports}
    if out is not None:
        with model_io.atomic_dir(out) as tmp:
            files = model_io.save_model(model, tmp / "model.onnx")
            report["target"]["artifacts"] = backend.lower(model, tmp)
            (tmp / CONFIG).write_text(pipelines.dump(spec), encoding="utf-8")
            (tmp / "report.md").write_text(reports.compile_markdown(report), encoding="utf-8")
            (tmp / "timings.json").write_text(reports.dumps(timings), encoding="utf-8")
            report["outputs"] = sorted([str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file()]
                                       + ["report.json", "report.html"])
            (tmp / "report.json").write_text(reports.dumps(report), encoding="utf-8")
            (tmp / "report.html").write_text(report_page.render(report), encoding="utf-8")
        log(f"wrote {Path(out)}/ ({', '.join(f.name for f in files)}, report.json, report.md, report.html, {CONFIG})")
    return CompileResult(model, report, timings)


def reads(source: FeedSource | None, cache_dir: Path | None = None) -> list[Path]:
    """What a command reads besides its model: the data's files and tokenizer, the cache."""
    return [*(source.paths() if source is not None else []), *([Path(cache_dir)] if cache_dir is not None else [])]


def _site_rows(model: ir.Model) -> list[dict]:
    """Every linear site, with its layer (None where no layers repeat) and label, found from structure."""
    from sparsecc.site_names import site_labels, site_layers

    analysis = analyze(model.graph)
    layers, labels = site_layers(analysis.sites), site_labels(model.graph, analysis)
    return [s.to_dict() | {"layer": layers.get(s.index), "label": labels[s.index]} for s in analysis.sites]


def compiled_config(model_path: str | os.PathLike) -> dict[str, Any]:
    """The resolved configuration written beside a compiled model (a file or its folder; {}
    for any other model)."""
    path = model_io.model_file(model_path).parent / CONFIG
    if not path.is_file():
        return {}
    spec = pipelines.read_yaml(path, "compiled model's configuration", "pass --tokenizer/--reference explicitly or rewrite it")
    return spec if isinstance(spec, dict) else {}


def evaluate(model_path: Any, source: FeedSource, reference: Any = None) -> dict:
    """Evaluate a model (a path: a file or a compile output folder; or any form compile_model
    takes) with the ort backend; compare
    against `reference` when given."""
    from sparsecc.backends.ort import OrtBackend
    from sparsecc.graph_forms import describe, form_of, to_ir

    if form_of(model_path) == "path":
        model_path = model_io.model_file(model_path)
    if reference is not None and form_of(reference) == "path":
        reference = model_io.model_file(reference)
    model = to_ir(model_path)
    ref = to_ir(reference) if reference is not None else None
    result = OrtBackend().evaluate(model, source, ref)
    config = compiled_config(Path(model_path)) if form_of(model_path) == "path" else {}
    return {"schema": reports.SCHEMA, "kind": "eval", "sparsecc": __version__,
            "model": describe(model_path), "reference": describe(reference) if reference is not None else None,
            "method": method(config), "data": source.describe(), "result": result}


# passes every compile has, or a target adds: they do not tell one method from another
_NOT_METHOD = {"discover-sites", "insert-thresholds", "partition"}


def method(config: dict[str, Any]) -> str:
    """How a compiled model was made, from its config.yaml: its pipeline's passes less those every
    compile has, e.g. `weight-scores + calibrate-thresholds` (an eval sweep draws one line each)."""
    passes = config.get("passes")
    if not isinstance(passes, list):
        return "not compiled by sparsecc"
    names = [p.get("pass") for p in passes if isinstance(p, dict)]
    return " + ".join(str(n) for n in names if n not in _NOT_METHOD) or "no thresholds"



def write_eval_report(out: str | os.PathLike, report: dict) -> None:
    """report.json, report.md and report.html of an eval (or an eval-sweep of several models)
    into `out`, atomically."""
    markdown = reports.eval_sweep_markdown(report) if report["kind"] == "eval-sweep" else reports.eval_markdown(report)
    with model_io.atomic_dir(out) as tmp:
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        (tmp / "report.json").write_text(reports.dumps(report), encoding="utf-8")
        (tmp / "report.html").write_text(report_page.render(report), encoding="utf-8")


def write_simulation_report(out: str | os.PathLike, report: dict) -> dict:
    """A simulation report into `out`, atomically: report.json,
    report.md, report.html and timings.json (its wall-time figures, taken out of `report` so
    the reports stay byte-identical). Returns those figures."""
    from sparsecc import backends

    speed = report.pop("speed")
    with model_io.atomic_dir(out) as tmp:
        (tmp / "report.md").write_text(backends.report_section(report).markdown(report), encoding="utf-8")
        (tmp / "report.json").write_text(reports.dumps(report), encoding="utf-8")
        (tmp / "timings.json").write_text(reports.dumps(speed), encoding="utf-8")
        (tmp / "report.html").write_text(report_page.render(report), encoding="utf-8")
    return speed
