"""Sweeps: a grid (or list) of compile configurations over one or more models, each cell
compiled, evaluated (and simulated when its target is seneca) as a Ray task, gathered into one
eval-sweep report.

    schema: sparsecc.sweep/1
    models:                       # name: path (the name starts each cell's name)
      tiny: samples/tiny_llama/model.onnx
    data:                         # calibration data, as a pipeline file's data:
      calib: ../shared/data/wikitext-2/valid.txt
      tokenizer: samples/tiny_llama
      seq_len: 64
      windows: 16
    eval:                         # held-out data; tokenizer and seq_len default to data's
      ppl: ../shared/data/wikitext-2/test.txt
      windows: 32
    simulate:                     # cells whose target is seneca; text defaults to eval's ppl
      tokens: 16
    compile:                      # options every cell shares
      refine: 1
    grid:                         # every combination of these values ...
      search: [calibrate-thresholds, allocate-sparsity]
      sparsity: [0.3, 0.5]
    cells:                        # ... and/or a list of cells
      - name: seneca-50
        sparsity: 0.5
        target: seneca
        resources: {num_cpus: 1, num_gpus: 0}
    retries: 2                    # tries again of a cell whose worker died

A cell's options are the compile flags with underscores (sparsity, mode, search, search_options,
quant, smooth, weight_scores, compensate_rank, finetune_steps, per_consumer, include_head, refine),
or `pipeline: FILE`, plus `target` and `resources` (what Ray reserves for it). Paths are
relative to where you run. Each cell writes OUT/cells/NAME/ in one atomic step (the compile
output, eval/, simulation/ and cell.json, which records the settings it was made with), so a
cell is either complete or absent; a second run skips the complete ones.
"""
from __future__ import annotations

import _thread
import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sparsecc import __version__, compiler, pipeline as pipelines, progress
from sparsecc import report as reports, report_page
from sparsecc.data import tokenizer_file
from sparsecc.errors import SparseccError, excerpt
from sparsecc.model_io import atomic_dir, atomic_write, check_output_dir, fingerprint, model_file

SCHEMA = "sparsecc.sweep/1"
KEYS = ("schema", "models", "data", "eval", "simulate", "compile", "grid", "cells", "retries")
CELL_KEYS = ("pipeline", "target", "resources")      # besides the compile options
EVAL_KEYS = {"ppl": str, "tokenizer": str, "seq_len": int, "windows": int}
SIMULATE_KEYS = {"text": str, "tokenizer": str, "tokens": int, "windows": int}
RESOURCE_KEYS = ("num_cpus", "num_gpus")
CELL_FILE = "cell.json"
MARKER = "sweep.yaml"         # a copy of the sweep file: OUT is a sweep folder and may be resumed
STOP_FILE = ".stop"           # in OUT while an interrupted sweep stops its cells (see _stopped_by)
EXTRA = 'pip install -c constraints.txt -e ".[sweep]"'
# Test-only: CELL=MARKER makes that cell's worker exit hard on its first try (tests/test_sweep.py).
CRASH_ONCE = "SPARSECC_TEST_CRASH_ONCE"


# The sweep file ------------------------------------------------------------------------------
def load(path: str | os.PathLike, cache_dir: Path | None = None) -> list[dict]:
    """The cells of the sweep file at `path`, each resolved and validated (plain values, so a
    Ray worker can run it): every error a file can hold is found here, before any work."""
    return cells_of(pipelines.read_yaml(path, "sweep file"), str(path), cache_dir)


def cells_of(spec: Any, where: str, cache_dir: Path | None = None) -> list[dict]:
    if not isinstance(spec, dict):
        raise SparseccError(f"{where}: expected a mapping with models:, data:, eval: and grid: or cells: "
                            f"(schema {SCHEMA})")
    if spec.get("schema", SCHEMA) != SCHEMA:
        raise SparseccError(f"{where}: unsupported schema {excerpt(spec['schema'])}; this sparsecc reads {SCHEMA}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise SparseccError(f"{where}: unknown key {excerpt(unknown[0])}; valid keys: {', '.join(KEYS)}")
    models = _models(spec.get("models"), where)
    data = pipelines.check_data(spec.get("data") or {}, where)
    _exist(data, ("calib", "tokenizer"), f"{where}: data")
    data = compiler.resolved_data(data)
    evaluation = _eval(_mapping(spec, "eval", where), data, where)
    simulation = _simulate(_mapping(spec, "simulate", where), evaluation, where)
    retries = spec.get("retries", 2)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise SparseccError(f"{where}: retries must be an integer 0 or more (got {excerpt(retries)})")
    configs = _configs(spec, where)
    cells = []
    for model_name, model in models.items():
        digest = fingerprint([model])
        for label, options, at in configs:
            cell = _cell(f"{model_name}_{label}", model, options, data, evaluation, simulation, f"{where}: {at}")
            cell |= {"model_name": model_name, "model_sha256": digest, "retries": retries,
                     "series": _series(model_name, options, len(models)),
                     "cache_dir": str(cache_dir) if cache_dir is not None else None}
            cells.append(cell)
    names = [c["name"] for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SparseccError(f"{where}: two cells are named {excerpt(twice[0])}; give list cells distinct `name:`s")
    return cells


def _mapping(spec: dict, key: str, where: str) -> dict:
    value = spec.get(key) or {}
    if not isinstance(value, dict):
        raise SparseccError(f"{where}: {key}: must be a mapping (got {excerpt(value)})")
    return value


def _types(values: dict, kinds: dict, where: str) -> None:
    for key, value in values.items():
        kind = kinds[key]
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise SparseccError(f"{where}: {key} must be {'a path' if kind is str else 'an integer'} (got {excerpt(value)})")
    _exist(values, [k for k, kind in kinds.items() if kind is str], where)


def _exist(values: dict, paths, where: str) -> None:
    for key in paths:
        if values.get(key) is not None and not Path(values[key]).exists():
            raise SparseccError(f"{where}: {key}: {values[key]} not found; check the path (relative to where you run)")


def _models(models: Any, where: str) -> dict[str, str]:
    if not isinstance(models, dict) or not models:
        raise SparseccError(f"{where}: models: must map a name to each model file, e.g. `models: {{tiny: "
                            "samples/tiny_llama/model.onnx}`")
    out = {}
    for name, path in models.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise SparseccError(f"{where}: models: name {excerpt(name)} must be letters, digits, '.', '_' or '-'")
        if not isinstance(path, str):
            raise SparseccError(f"{where}: models: {name}: give a path (got {excerpt(path)})")
        try:
            out[name] = str(model_file(path).resolve())   # a compile output folder names its model.onnx
        except SparseccError as exc:
            raise SparseccError(f"{where}: models: {name}: {exc}") from None
    return out


def _eval(spec: dict, data: dict, where: str) -> dict:
    unknown = sorted(set(spec) - set(EVAL_KEYS))
    if unknown:
        raise SparseccError(f"{where}: eval: unknown key {excerpt(unknown[0])}; valid keys: {', '.join(EVAL_KEYS)}")
    if not spec.get("ppl"):
        raise SparseccError(f"{where}: eval: needs ppl: the held-out text (or .npz of feeds) each cell is evaluated on")
    _types(spec, EVAL_KEYS, f"{where}: eval")
    out = {"tokenizer": data.get("tokenizer"), "seq_len": data["seq_len"], "windows": None} | spec
    return out | {k: str(Path(out[k]).resolve()) for k in ("ppl", "tokenizer") if out.get(k)}


def _simulate(spec: dict, evaluation: dict, where: str) -> dict:
    unknown = sorted(set(spec) - set(SIMULATE_KEYS))
    if unknown:
        raise SparseccError(f"{where}: simulate: unknown key {excerpt(unknown[0])}; valid keys: {', '.join(SIMULATE_KEYS)}")
    _types(spec, SIMULATE_KEYS, f"{where}: simulate")
    out = {"text": evaluation["ppl"], "tokenizer": evaluation["tokenizer"], "tokens": 64, "windows": 1} | spec
    if out["tokens"] < 2 or out["windows"] < 1:
        raise SparseccError(f"{where}: simulate: tokens must be at least 2 and windows at least 1")
    return out | {k: str(Path(out[k]).resolve()) for k in ("text", "tokenizer") if out.get(k)}


def _configs(spec: dict, where: str) -> list[tuple[str, dict, str]]:
    """(label, options, where) per configuration: the grid's combinations, then the listed cells,
    each over the shared `compile:` options."""
    base = _mapping(spec, "compile", where)
    grid = _mapping(spec, "grid", where)
    listed = spec.get("cells") or []
    if not isinstance(listed, list):
        raise SparseccError(f"{where}: cells: must be a list of cells (mappings of options)")
    if not grid and not listed:
        raise SparseccError(f"{where}: no cells: give grid: (option: [values]) or cells: (a list)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SparseccError(f"{where}: grid: {key} must be a list of values (got {excerpt(values)})")
    out = []
    for combo in itertools.product(*grid.values()) if grid else ():
        options = dict(zip(grid, combo))
        out.append((_label(options), base | options, "grid " + ", ".join(f"{k}={v}" for k, v in options.items())))
    for i, cell in enumerate(listed, 1):
        if not isinstance(cell, dict):
            raise SparseccError(f"{where}: cells[{i}] must be a mapping of options (got {excerpt(cell)})")
        options = {k: v for k, v in cell.items() if k != "name"}
        name = cell.get("name", _label(options))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", name):
            raise SparseccError(f"{where}: cells[{i}]: name {excerpt(name)} must be letters, digits, '.', '_', '=', '+' or '-'")
        out.append((name, base | options, f"cells[{i}]"))
    return out


def _label(options: dict) -> str:
    """A folder-safe name for a configuration: its options as key-value, e.g. sparsity-0.5_search-allocate-sparsity."""
    def text(value):
        if isinstance(value, dict):
            return "+".join(f"{k}={v}" for k, v in value.items())
        return Path(value).stem if isinstance(value, str) and value.endswith((".yaml", ".yml", ".toml")) else str(value)

    return "_".join(re.sub(r"[^A-Za-z0-9.=+-]+", "-", f"{k}-{text(v)}") for k, v in options.items()) or "default"


def _series(model: str, options: dict, models: int) -> str:
    """The line a cell is drawn on in the sparsity/accuracy curve: its method, i.e. its own
    options but the sparsity (and its model when the sweep has several)."""
    method = _label({k: v for k, v in options.items() if k not in ("sparsity", "resources")})
    if method == "default":
        return model
    return f"{model} {method}" if models > 1 else method


def _cell(name: str, model: str, options: dict, data: dict, evaluation: dict, simulation: dict, where: str) -> dict:
    """One cell as plain values: its resolved pipeline document, target, data and settings."""
    from sparsecc import backends

    unknown = sorted(set(options) - set(CELL_KEYS) - set(pipelines.option_names()))
    if unknown:
        raise SparseccError(f"{where}: unknown option {excerpt(unknown[0])}; valid options: "
                            f"{', '.join(CELL_KEYS + tuple(pipelines.option_names()))}")
    target = options.get("target", "ort")
    if not isinstance(target, str) or target not in backends.registry():
        raise SparseccError(f"{where}: target must be one of {', '.join(backends.registry())} (got {excerpt(target)})")
    flags = {k: v for k, v in options.items() if k not in CELL_KEYS}
    if "pipeline" in options:
        if flags:
            raise SparseccError(f"{where}: {next(iter(flags))} conflicts with pipeline; set pass options in the pipeline file")
        if not isinstance(options["pipeline"], str):
            raise SparseccError(f"{where}: pipeline must be a path to a pipeline file (got {excerpt(options['pipeline'])})")
        passes, own = pipelines.load(options["pipeline"])
        data = compiler.resolved_data(own, data)    # the sweep's data over the pipeline file's
    else:
        passes = pipelines.from_options(flags, thresholds="calib" in data or flags.get("sparsity") is not None,
                                        where=where)
    return {"name": name, "model": model, "options": {k: v for k, v in options.items() if k != "resources"},
            "pipeline": pipelines.to_spec(passes, data), "target": target, "eval": evaluation,
            "simulate": simulation if target == "seneca" else None,
            "resources": _resources(options.get("resources"), where)}


def _resources(spec: Any, where: str) -> dict:
    spec = {} if spec is None else spec
    if not isinstance(spec, dict) or set(spec) - set(RESOURCE_KEYS):
        raise SparseccError(f"{where}: resources: takes {' and '.join(RESOURCE_KEYS)} (what Ray reserves for the cell)")
    out = {"num_cpus": 1, "num_gpus": 0} | spec
    for key, value in out.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (key == "num_cpus" and value == 0):
            raise SparseccError(f"{where}: resources: {key} must be a number {'above' if key == 'num_cpus' else 'of'} "
                                f"0{'' if key == 'num_cpus' else ' or more'} (got {excerpt(value)})")
    return out


def settings(cell: dict) -> dict:
    """What a cell's outputs depend on: equal settings, equal outputs (so a complete cell with
    them is not computed again). Not the resources or the cache folder."""
    return {k: cell[k] for k in ("name", "model", "model_sha256", "pipeline", "target", "eval", "simulate")}


# One cell (a Ray task) -------------------------------------------------------------------------
def run_cell(cell: dict, out: str, crash_marker: str | None = None) -> dict:
    """Compile, evaluate (and simulate) one cell into OUT/cells/NAME atomically; return its
    record (cell.json). A failure is returned as a record with its one-line error, so the rest
    of the sweep goes on."""
    if crash_marker is not None and not os.path.exists(crash_marker):  # test-only: the first try dies
        Path(crash_marker).touch()
        os._exit(1)
    stop = Path(out) / STOP_FILE
    if stop.exists():
        return {"status": "cancelled"}
    from sparsecc import calibration, runtime

    progress.set_verbosity(0)      # cells run side by side: their bars would interleave
    runtime.set_threads(max(1, int(cell["resources"]["num_cpus"])))
    before = dict(calibration.STATS)
    started = time.monotonic()
    try:
        with _stopped_by(stop):
            record = _compute(cell, Path(out) / "cells" / cell["name"], calibration.STATS, before)
    except KeyboardInterrupt:
        if not stop.exists():     # the user's own Ctrl-C (run_cell called outside a sweep)
            raise
        return {"status": "cancelled"}
    except SparseccError as exc:
        return failed(cell, str(exc))
    except MemoryError:
        return failed(cell, "out of memory (MemoryError); give the cell more memory or lower its windows")
    except Exception as exc:   # a bug, not bad input: the one line, and the traceback with -v
        return failed(cell, f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())}",
                      traceback.format_exc())
    return record | {"seconds": round(time.monotonic() - started, 3)}


@contextlib.contextmanager
def _stopped_by(flag: Path):
    """Raise KeyboardInterrupt in this thread (a Ray task's: the worker's main thread) once
    `flag` exists, so the cell unwinds and its temporary folder is removed. The sweep cancels
    its cells this way, not with ray.cancel, which races a task that is just finishing and
    aborts the driver (Ray 2.60: "Tried to complete task that was not pending")."""
    done, lock, fired = threading.Event(), threading.Lock(), threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            if flag.exists():
                with lock:
                    if not done.is_set():
                        fired.set()
                        _thread.interrupt_main()
                return

    watcher = threading.Thread(target=watch, name="sweep-stop", daemon=True)
    watcher.start()
    arrived = False
    try:
        yield
    except KeyboardInterrupt:
        arrived = True
        raise
    finally:
        with lock:
            done.set()
        watcher.join()
        if fired.is_set() and not arrived:    # fired as the cell finished: its interrupt is due now
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(0.01)


def _compute(cell: dict, final: Path, stats: dict, before: dict) -> dict:
    from sparsecc.backends.seneca.simulation import simulate

    with atomic_dir(final) as tmp:
        passes, data = pipelines.from_spec(cell["pipeline"], cell["name"])
        cache = Path(cell["cache_dir"]) if cell["cache_dir"] else None
        calib = compiler.data_source(data.get("calib"), data.get("tokenizer"), data["seq_len"], data.get("windows"),
                                     data.get("samples", 0), cell["model"], data.get("sample_temperature", 1.0),
                                     cache_dir=cache)
        compiled = compiler.compile_model(cell["model"], passes, calib, out=tmp, target=cell["target"], data=data,
                                          allow_test_split=bool(data.get("allow_test_split")),
                                          cache_dir=cache)
        ev = cell["eval"]
        run = compiler.evaluate(tmp / "model.onnx", compiler.data_source(ev["ppl"], ev["tokenizer"], ev["seq_len"],
                                                                          ev["windows"]), cell["model"])
        run["model"] = str(final / "model.onnx")   # where it lies once the cell is complete
        compiler.write_eval_report(tmp / "eval", run)
        record = {"schema": reports.SCHEMA, "kind": "sweep-cell", "sparsecc": __version__, "settings": settings(cell),
                  "status": "ok", "calibrated_sparsity": _calibrated(compiled.report), "eval": run}
        if cell["simulate"]:
            sim = cell["simulate"]
            result = simulate(tmp, compiler.data_source(sim["text"], sim["tokenizer"], sim["tokens"], sim["windows"]))
            compiler.write_simulation_report(tmp / "simulation", result)
            record["simulation"] = {"energy_ratio": result["ratio"]["energy"], "latency_ratio": result["ratio"]["latency"],
                                    "energy_pj_per_token": result["sparse"]["energy_pj_per_token"]["total"],
                                    "argmax_vs_ort": result.get("vs_ort", {}).get("argmax_agreement")}
        (tmp / CELL_FILE).write_text(reports.dumps(record), encoding="utf-8")
    # run-dependent (which of two cells sharing statistics measured them): timings.json, not the report
    return record | {"statistics": {k: stats[k] - before[k] for k in stats}}


def _calibrated(report: dict) -> float | None:
    setters = [p for p in report["passes"] if "calibrated_model_sparsity" in p["details"]]
    return setters[-1]["details"]["calibrated_model_sparsity"] if setters else None


def failed(cell: dict, error: str, detail: str | None = None) -> dict:
    return {"kind": "sweep-cell", "settings": settings(cell), "status": "failed", "error": error} | (
        {"traceback": detail} if detail else {})


def complete(cell: dict, out: Path) -> dict | None:
    """The record of a cell already complete in `out` with the same settings, else None."""
    try:
        record = json.loads((out / "cells" / cell["name"] / CELL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = record.get("status") == "ok" and record.get("settings") == json.loads(reports.dumps(settings(cell)))
    return record if same else None


# The sweep -------------------------------------------------------------------------------------
def run_sweep(path: str | os.PathLike, out: str | os.PathLike, address: str | None = None, cpus: int | None = None,
              cache_dir: Path | None = None) -> dict:
    """Run every cell of the sweep file at `path` not yet complete in `out` as a Ray task (on
    the cluster at `address`, else on a Ray runtime started here with `cpus` CPUs); write
    OUT/report.{json,md,html}; return the report (kind eval-sweep, with a row per cell)."""
    cells = load(path, cache_dir)
    out = Path(out)
    _check_out(out)
    check_output_dir(out, _reads(cells), marker=MARKER)   # the sweep file itself is copied in as is
    _import_ray(address)      # before anything is written
    atomic_write(out / MARKER, lambda f: f.write(Path(path).read_bytes()))
    (out / STOP_FILE).unlink(missing_ok=True)    # left by a sweep that was killed while stopping
    records = {c["name"]: r for c in cells if (r := complete(c, out)) is not None}
    todo = [c for c in cells if c["name"] not in records]
    progress.log(f"sweep: {len(cells)} cells, {len(records)} complete already, {len(todo)} to run")
    timings = {}
    if todo:
        with _ray_runtime(address, cpus) as ray:
            for name, record in _run_cells(ray, todo, out).items():
                run_dependent = {k: record.pop(k) for k in ("seconds", "statistics") if k in record}
                records[name], timings[name] = record, run_dependent
    report = sweep_report([(c, records[c["name"]]) for c in cells], Path(path))
    for name, text in (("report.json", reports.dumps(report)), ("report.md", reports.sweep_markdown(report)),
                       ("report.html", report_page.render(report)), ("timings.json", reports.dumps({"cells": timings}))):
        atomic_write(out / name, lambda f, text=text: f.write(text.encode("utf-8")))
    return report


def _reads(cells: list[dict]) -> list[str]:
    """Every model, data file, tokenizer and pipeline file the cells read."""
    paths = set()
    for cell in cells:
        paths.add(cell["model"])
        data = cell["pipeline"].get("data", {})
        paths.update([data["calib"]] if data.get("calib") else [])
        paths.update([str(tokenizer_file(data["tokenizer"]))] if data.get("tokenizer") else [])
        for section in (cell["eval"], cell["simulate"] or {}):
            paths.update(str(v) for k, v in section.items() if k in ("ppl", "text") and v)
            paths.update(str(tokenizer_file(v)) for k, v in section.items() if k == "tokenizer" and v)
        if isinstance(cell["options"].get("pipeline"), str):
            paths.add(cell["options"]["pipeline"])
    return sorted(paths)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SparseccError(f"output path {out} is a file; choose a folder with -o")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise SparseccError(f"output folder {out} exists and is not a sweep's (no {MARKER}); choose another -o or empty it")


@contextlib.contextmanager
def _ray_runtime(address: str | None, cpus: int | None):
    """Ray, joined at `address` or started here (and stopped after); a runtime this process
    already started (the Python API, the tests) is used as it is. Ray prints a dead worker's
    notice on stdout: it goes to stderr (or nowhere with -q/--json) so stdout keeps the result."""
    ray = _import_ray(address)
    notices = open(os.devnull, "w") if progress.quiet() else sys.stderr
    started, temp = False, None
    try:
        with contextlib.redirect_stdout(notices):
            if not ray.is_initialized():
                quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
                if address is not None:
                    try:
                        ray.init(address=address, **quiet)
                    except (ConnectionError, ValueError, RuntimeError) as exc:
                        raise SparseccError(f"cannot join the Ray cluster at {address} ({' '.join(str(exc).split())[:200]}); "
                                            "start one with `ray start --head` or drop --address") from None
                else:
                    # Ray's sockets and logs, removed after; where Ray keeps its own (sockets allow 107 bytes of path)
                    temp = tempfile.mkdtemp(prefix="sparsecc-ray-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")
                    ray.init(num_cpus=cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp, **quiet)
                started = True
            yield ray
    finally:
        if started:
            ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
        if notices is not sys.stderr:
            notices.close()


def _import_ray(address: str | None):
    """Ray; for a runtime started here or joined on the loopback, one that listens on the
    loopback only (Ray's local mode, as on macOS: read when ray is first imported)."""
    if address is None or address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]"):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise SparseccError(f"sweeps run on Ray, which is not installed; install the sweep extra: {EXTRA}") from None
    return ray


def _run_cells(ray, cells: list[dict], out: Path) -> dict[str, dict]:
    """Every cell's record (run-dependent figures, its seconds and statistics, included), with
    progress and ETA as they finish. Ctrl-C (or SIGTERM) cancels the running cells, each
    removing its unfinished folder, and is re-raised."""
    task = ray.remote(run_cell)
    largest = _largest_node(ray)
    pending, records = {}, {}
    total, start = len(cells), time.monotonic()
    bar = progress.bar(total=total, desc="sweep", unit="cell")

    def finish(cell: dict, record: dict) -> None:
        records[cell["name"]] = record
        bar.update(1)
        _report_progress(cell, record, len(records), total, start)

    try:
        for cell in cells:
            need = cell["resources"]
            if need["num_cpus"] > largest["CPU"] or need["num_gpus"] > largest["GPU"]:
                finish(cell, failed(cell, f"needs {need['num_cpus']:g} CPU(s) and {need['num_gpus']:g} GPU(s), more than "
                                          f"any node of the Ray cluster has ({largest['CPU']:g} CPUs, {largest['GPU']:g} "
                                          "GPUs); lower its resources or join a larger cluster (--address)"))
                continue
            ref = task.options(num_cpus=need["num_cpus"], num_gpus=need["num_gpus"], max_retries=cell["retries"],
                               name=cell["name"]).remote(cell, str(out), _crash_marker(cell["name"]))
            pending[ref] = cell
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            finish(cell, _result(ray, ref, cell))
    except BaseException:
        _cancel(ray, list(pending), out, [c["name"] for c in pending.values()])
        raise
    finally:
        bar.close()
    return records


def _largest_node(ray) -> dict:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    return {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("CPU", "GPU")}


def _crash_marker(name: str) -> str | None:
    cell, _, marker = os.environ.get(CRASH_ONCE, "").partition("=")
    return marker if cell == name and marker else None


def _result(ray, ref, cell: dict) -> dict:
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.OutOfMemoryError:
        return failed(cell, "out of memory: Ray's memory monitor stopped its worker; give it more memory (run fewer "
                            "cells at once: raise resources.num_cpus) or lower its windows")
    except (rex.WorkerCrashedError, rex.NodeDiedError, rex.LocalRayletDiedError) as exc:
        return failed(cell, f"its worker died on each of {cell['retries'] + 1} tries ({type(exc).__name__}); "
                            "see the Ray logs of the node, or lower its memory use")
    except rex.RayError as exc:
        return failed(cell, f"Ray could not run it: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")


def _report_progress(cell: dict, record: dict, done: int, total: int, start: float) -> None:
    elapsed = time.monotonic() - start
    left = elapsed / done * (total - done)
    eta = f"; about {left:.0f} s left" if done < total else ""
    progress.log(f"[{done}/{total}] {cell['name']}: {_outcome(record)} ({elapsed:.0f} s{eta})")
    if record.get("traceback"):
        progress.log(record["traceback"].rstrip(), level=2)


def _outcome(record: dict) -> str:
    if record["status"] != "ok":
        return f"failed: {record['error']}"
    result = record["eval"]["result"]
    ppl = f"perplexity {result['perplexity']:.3f}, " if "perplexity" in result else ""
    return f"{ppl}sparsity {result['macs']['body']['sparsity']:.1%} (body)"


def _cancel(ray, refs: list, out: Path, names: list[str]) -> None:
    """Stop the cells: OUT/.stop tells each running cell to unwind (removing its temporary
    folder) and each one not yet started to return at once; a cell still running 30 s later is
    killed, and what it left removed."""
    stop = out / STOP_FILE
    stop.touch()
    try:
        _, left = ray.wait(refs, num_returns=len(refs), timeout=30) if refs else ([], [])
        for ref in left:
            ray.cancel(ref, force=True)
        if left:
            ray.wait(left, num_returns=len(left), timeout=10)
    finally:
        stop.unlink(missing_ok=True)
    for name in names:
        for leftover in (out / "cells").glob(f".{name}.*-*"):   # atomic_dir's .NAME.tmp-* / .NAME.old-*
            shutil.rmtree(leftover, ignore_errors=True)


# The report ------------------------------------------------------------------------------------
def sweep_report(cells: list[tuple[dict, dict]], path: Path) -> dict:
    """One eval-sweep report: a row per cell (status, its one-line error), and the evaluation
    of each complete cell as a run, with the line (series) it is drawn on."""
    rows, runs = [], []
    for cell, record in cells:
        row = {"cell": cell["name"], "model": cell["model_name"], "options": cell["options"], "target": cell["target"],
               "status": record["status"]}
        if record["status"] == "ok":
            row["calibrated_sparsity"] = record["calibrated_sparsity"]
            row |= {"simulation": record["simulation"]} if "simulation" in record else {}
            runs.append(record["eval"] | {"cell": cell["name"], "method": cell["series"]})
        else:
            row["error"] = record["error"]
        rows.append(row)
    failures = sum(r["status"] != "ok" for r in rows)
    return {"schema": reports.SCHEMA, "kind": "eval-sweep", "sparsecc": __version__,
            "sweep": {"file": str(path.resolve()), "cells": len(rows), "ok": len(rows) - failures, "failed": failures},
            "cells": rows, "runs": runs}
