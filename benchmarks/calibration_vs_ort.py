"""Calibration cost: sparsecc's streaming histograms vs ONNX Runtime's quantization calibrators.

    python samples/smollm2/build.py                                  # once: builds build/smollm2-135m/
    python benchmarks/calibration_vs_ort.py --json /tmp/calibration_vs_ort.json   # ~12 min on 2 cores
    python benchmarks/calibration_vs_ort.py --rss-scaling            # ~8 min: `sparsecc compile` peak RSS, 16 vs 64 windows

Default mode: every contestant calibrates SmolLM2-135M on the same `--windows` x `--seq-len`
token windows of WikiText-2 valid (sparsecc.data.TextWindows: evenly spread over the text)
and runs in its own subprocess, so its peak RSS (the kernel's high-water mark, from wait4)
is its own. Contestants:

- sparsecc: the work of `sparsecc compile` with the default pipeline (discover-sites,
  insert-thresholds, calibrate-thresholds), calibration cache off, refine=0: one pass over
  the data that keeps one fixed-size |x| histogram per tensor (sparsecc.calibration.collect).
  The compiled model is not written (neither contestant writes a model).
- sparsecc-refine1: the same with the default refine=1: the dense pass, then a refine round
  on every `refine_every`-th window (default 4: 1.25 passes over the data).
- ort-percentile / ort-minmax: `onnxruntime.quantization.calibrate.create_calibrator` with
  CalibrationMethod.Percentile / MinMax and its default options, fed by a
  CalibrationDataReader over the same windows, then `collect_data` and `compute_data`.
  By default it calibrates exactly the tensors sparsecc thresholds (the activation inputs of
  the linear MatMuls, from sparsecc.sites.analyze); `--ort-tensors matmul` instead lets it
  pick every float input and output of every MatMul (op_types_to_calibrate=['MatMul']).
  Its session runs with graph optimizations off, as ORT's calibrators create it. ORT works on
  a private copy of the model, made before timing (it writes `<model>-inferred.onnx` beside
  the model, and onnx refuses external data behind a symbolic or hard link).

Wall time is the contestant's work only: model loading, graph preparation, session creation,
the pass over the data and the final statistics; Python imports and tokenization are
excluded (the "base RSS" column is the child's RSS just before its work starts). A
contestant that passes `--timeout` or whose RSS passes `--mem-limit-mb` (or that would
leave the machine with under 1 GiB available) is killed and reported as such, with the
peak it reached.

`--rss-scaling` runs the `sparsecc compile` CLI (writing its outputs to a temporary folder,
--no-cache) with `--windows 16` and `--windows 64` for each `--scaling-refine` value and
prints both peaks and their relative change: streaming calibration should keep it under 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "build" / "smollm2-135m" / "model.onnx"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CONTESTANTS = ("sparsecc", "ort-percentile", "ort-minmax", "sparsecc-refine1")
RESERVE_MB = 1024  # kill a child rather than let the machine's available memory drop below this


# ----------------------------------------------------------------------------- measurement

def _meminfo_mb(key: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _rss_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_measured(cmd: list[str], timeout: float, mem_limit_mb: float, log_path: Path) -> dict:
    """Run `cmd` to completion; return its exit status, wall time and exact peak RSS.

    The peak is the kernel's high-water mark for this one child (os.wait4's ru_maxrss), so
    each measurement is independent of earlier children. The RSS is also polled, to kill the
    child when it passes `timeout`, `mem_limit_mb`, or would leave the machine short."""
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    killed = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_mb(proc.pid) or 0.0
        if time.perf_counter() - start > timeout:
            killed = f"timed out after {timeout:.0f} s"
        elif rss > mem_limit_mb:
            killed = f"killed at {rss:.0f} MB RSS (limit {mem_limit_mb:.0f} MB)"
        elif _meminfo_mb("MemAvailable") < RESERVE_MB:
            killed = f"killed at {rss:.0f} MB RSS: machine had under {RESERVE_MB} MB available"
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "killed": killed, "process_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


# ----------------------------------------------------------------------------- contestants (child side)

def _windows(job: dict):
    from sparsecc.data import TextWindows

    return TextWindows(job["data"], job["tokenizer"], seq_len=job["seq_len"], limit=job["windows"])


def child_sparsecc(job: dict, refine: int) -> dict:
    import sparsecc
    from sparsecc import progress

    progress.set_verbosity(0)
    source = _windows(job)
    base = _rss_mb()
    start = time.perf_counter()
    result = sparsecc.compile_model(job["model"], sparsecc.default_pipeline(refine=refine), source,
                                    out=None, cache_dir=None)
    wall = time.perf_counter() - start
    calib = next(p["details"] for p in result.report["passes"] if p["pass"] == "calibrate-thresholds")
    calib_config = next(p["config"] for p in result.report["passes"] if p["pass"] == "calibrate-thresholds")
    return {"windows": len(source), "base_rss_mb": round(base, 1), "wall_s": round(wall, 2),
            "timings": result.timings, "tensors": len(calib["thresholds"]) + len(calib["natural"]),
            "data_passes": 1 + refine / calib_config["refine_every"], "calibrated_model_sparsity": calib["calibrated_model_sparsity"]}


def child_ort(job: dict, method: str) -> dict:
    from onnxruntime.quantization import calibrate

    source = _windows(job)
    wanted = set(job["tensors"]) if job["ort_tensors"] == "sites" else None
    if wanted is not None:
        # create_calibrator takes op types, not tensor names: narrow its own selection (every
        # float input/output of a MatMul) to the tensors sparsecc calibrates.
        select = calibrate.CalibraterBase.select_tensors_to_calibrate

        def select_sites(self, model):
            tensors, value_infos = select(self, model)
            missing = wanted - tensors
            if missing:
                raise RuntimeError(f"ORT's selection lacks {len(missing)} site tensors, e.g. {min(missing)}")
            return wanted, value_infos

        calibrate.CalibraterBase.select_tensors_to_calibrate = select_sites

    class Reader(calibrate.CalibrationDataReader):
        def __init__(self):
            self.feeds = source.feeds(["input_ids"])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory(prefix="calib-ort-") as tmp:
        model = Path(job["ort_model"])  # a private copy: ORT writes `<model>-inferred.onnx` beside it
        base = _rss_mb()
        start = time.perf_counter()
        calibrator = calibrate.create_calibrator(
            model, ["MatMul"], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(calibrate.CalibrationMethod, method))
        ready = time.perf_counter()
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
        wall = time.perf_counter() - start
    return {"windows": len(source), "base_rss_mb": round(base, 1), "wall_s": round(wall, 2),
            "timings": {"create_calibrator": round(ready - start, 2), "collect_and_compute": round(wall - (ready - start), 2)},
            "tensors": len(ranges.keys()), "data_passes": 1}


def child_main(name: str, job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    run = {"sparsecc": lambda: child_sparsecc(job, 0), "sparsecc-refine1": lambda: child_sparsecc(job, 1),
           "ort-percentile": lambda: child_ort(job, "Percentile"), "ort-minmax": lambda: child_ort(job, "MinMax")}[name]
    Path(result_path).write_text(json.dumps(run()))


# ----------------------------------------------------------------------------- parent side

def site_tensors(model: Path) -> list[str]:
    """The tensors sparsecc calibrates: the sources of every thresholded (non-head) linear site,
    plus the naturally sparse ones it measures."""
    from sparsecc.model_io import load_model
    from sparsecc.sites import analyze

    return sorted({s.source for s in analyze(load_model(model).graph).sites if not s.head})


def compare(args, tmp: Path) -> dict:
    job = {"model": str(args.model), "tokenizer": str(args.tokenizer), "data": str(args.data),
           "seq_len": args.seq_len, "windows": args.windows, "ort_tensors": args.ort_tensors,
           "tensors": site_tensors(args.model)}
    if any(name.startswith("ort-") for name in args.contestants):
        # onnx refuses external data behind a symbolic or hard link, so ORT gets a real copy.
        import onnx

        proto = onnx.load(args.model, load_external_data=False)
        data_files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        for name in [args.model.name, *sorted(data_files)]:
            (tmp / "ort-model" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(args.model.parent / name, tmp / "ort-model" / name)
        job["ort_model"] = str(tmp / "ort-model" / args.model.name)
    job_path = tmp / "job.json"
    job_path.write_text(json.dumps(job))
    rows = []
    for name in args.contestants:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result_path, log_path = tmp / f"{name}.json", tmp / f"{name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", name, str(job_path), str(result_path)]
        row = {"contestant": name} | run_measured(cmd, args.timeout, args.mem_limit_mb, log_path)
        if result_path.is_file():
            row |= json.loads(result_path.read_text())
            row["status"] = "ok"
        else:
            row["status"] = row["killed"] or f"failed (exit {row['returncode']})"
            row["log_tail"] = _tail(log_path)
        rows.append(row)
        print(f"  {name}: {row['status']}, peak RSS {row['peak_rss_mb']:.0f} MB, "
              f"{row.get('wall_s', row['process_s'])} s", file=sys.stderr, flush=True)
    print_compare(args, job, rows)
    return {"mode": "compare", "model": job["model"], "data": job["data"], "seq_len": args.seq_len,
            "windows": args.windows, "ort_tensors": args.ort_tensors, "site_tensors": len(job["tensors"]),
            "mem_limit_mb": round(args.mem_limit_mb), "timeout_s": args.timeout, "results": rows}


def print_compare(args, job: dict, rows: list[dict]) -> None:
    ref = next((r for r in rows if r["contestant"] == "sparsecc" and r["status"] == "ok"), None)
    print(f"\nCalibration of {Path(job['model']).parent.name}: {args.windows} windows x {args.seq_len} tokens of "
          f"{Path(job['data']).name}; sparsecc site tensors: {len(job['tensors'])}; ORT tensors: {args.ort_tensors}")
    head = (f"{'contestant':18} {'windows':>7} {'tensors':>7} {'passes':>6} {'wall (s)':>9} {'peak RSS (MB)':>14} "
            f"{'base RSS (MB)':>14} {'time x':>7} {'RSS x':>6}  status")
    print(head)
    print("-" * len(head))
    for r in rows:
        ok = r["status"] == "ok"
        wall = f"{r['wall_s']:9.1f}" if ok else f"{'>' + format(r['process_s'], '.0f'):>9}"
        t_ratio = f"{r['wall_s'] / ref['wall_s']:7.2f}" if ok and ref else f"{'-':>7}"
        m_ratio = f"{'' if ok else '>='}{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if ref else "-"
        base = f"{r['base_rss_mb']:14.0f}" if ok else f"{'-':>14}"
        print(f"{r['contestant']:18} {r.get('windows', args.windows):7d} {r.get('tensors', '-'):>7} "
              f"{r.get('data_passes', '-'):>6} {wall} {r['peak_rss_mb']:14.0f} {base} {t_ratio} {m_ratio:>6}  {r['status']}")
    print("wall: the contestant's work (load, prepare, session, data pass(es), statistics), no imports or "
          "tokenization; peak RSS: whole child process (wait4 ru_maxrss); x: ratio to sparsecc (refine=0)")
    for r in rows:
        if r["status"] != "ok" and r["log_tail"]:
            print(f"\n{r['contestant']} log tail:\n{r['log_tail']}")


def rss_scaling(args, tmp: Path) -> dict:
    rows = []
    for refine in args.scaling_refine:
        for windows in args.scaling_windows:
            print(f"running sparsecc compile --windows {windows} --refine {refine} ...", file=sys.stderr, flush=True)
            out = tmp / f"out-w{windows}-r{refine}"
            cmd = [sys.executable, "-m", "sparsecc.cli", "compile", str(args.model), "-o", str(out),
                   "--calib", str(args.data), "--tokenizer", str(args.tokenizer), "--seq-len", str(args.seq_len),
                   "--windows", str(windows), "--no-cache", "--refine", str(refine), "-q"]
            log_path = tmp / f"compile-w{windows}-r{refine}.log"
            row = {"windows": windows, "refine": refine, "command": " ".join(cmd[1:])}
            row |= run_measured(cmd, args.timeout, args.mem_limit_mb, log_path)
            row["status"] = "ok" if row["returncode"] == 0 and not row["killed"] else \
                (row["killed"] or f"failed (exit {row['returncode']})")
            if row["status"] != "ok":
                row["log_tail"] = _tail(log_path)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(f"  {row['status']}, peak RSS {row['peak_rss_mb']:.0f} MB, {row['process_s']} s", file=sys.stderr, flush=True)
    print(f"\nPeak RSS of the `sparsecc compile` process ({Path(args.model).parent.name}, seq-len {args.seq_len}, "
          f"--no-cache, output written to a temporary folder)")
    lo, hi = min(args.scaling_windows), max(args.scaling_windows)
    head = f"{'refine':>6} {'windows':>7} {'process (s)':>11} {'peak RSS (MB)':>14}  status"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['refine']:6d} {r['windows']:7d} {r['process_s']:11.1f} {r['peak_rss_mb']:14.0f}  {r['status']}")
    summary = []
    for refine in args.scaling_refine:
        a = next(r for r in rows if r["refine"] == refine and r["windows"] == lo)
        b = next(r for r in rows if r["refine"] == refine and r["windows"] == hi)
        if a["status"] == b["status"] == "ok":
            change = b["peak_rss_mb"] / a["peak_rss_mb"] - 1
            verdict = "bounded (< 10%)" if abs(change) < 0.10 else "NOT bounded (>= 10%)"
            print(f"refine {refine}: {lo} -> {hi} windows: peak RSS {a['peak_rss_mb']:.0f} -> {b['peak_rss_mb']:.0f} MB, "
                  f"change {100 * change:+.1f}%  {verdict}")
            summary.append({"refine": refine, "from_windows": lo, "to_windows": hi, "relative_change": round(change, 4)})
    for r in rows:
        if r["status"] != "ok" and r["log_tail"]:
            print(f"\nwindows {r['windows']} refine {r['refine']} log tail:\n{r['log_tail']}")
    return {"mode": "rss-scaling", "model": str(args.model), "seq_len": args.seq_len,
            "mem_limit_mb": round(args.mem_limit_mb), "results": rows, "summary": summary}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:  # internal: one contestant in this process
        child_main(*argv[1:4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the model's folder")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS),
                    help="run these, in this order (ratios are against sparsecc)")
    ap.add_argument("--ort-tensors", choices=["sites", "matmul"], default="sites",
                    help="sites: the tensors sparsecc calibrates; matmul: ORT's own op_types_to_calibrate=['MatMul'] choice")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per contestant before it is killed")
    ap.add_argument("--mem-limit-mb", type=float, default=None,
                    help="kill a contestant above this RSS (default: 90%% of the memory available at start)")
    ap.add_argument("--rss-scaling", action="store_true", help="measure `sparsecc compile` peak RSS vs --scaling-windows instead")
    ap.add_argument("--scaling-windows", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--scaling-refine", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    args.model = args.model.resolve()
    args.tokenizer = (args.tokenizer or args.model.parent).resolve()
    args.data = args.data.resolve()
    if args.mem_limit_mb is None:
        args.mem_limit_mb = 0.9 * _meminfo_mb("MemAvailable")
    for path in (args.model, args.tokenizer, args.data):
        if not path.exists():
            sys.exit(f"not found: {path}" + ("; run `python samples/smollm2/build.py` first" if path == args.model else ""))

    with tempfile.TemporaryDirectory(prefix="calibration-bench-") as tmp:
        result = (rss_scaling if args.rss_scaling else compare)(args, Path(tmp))
    result["machine"] = {"cpus": os.cpu_count(), "mem_total_mb": round(_meminfo_mb("MemTotal")),
                         "load_avg_at_end": os.getloadavg()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
