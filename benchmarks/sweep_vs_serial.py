"""Wall time of one grid as a serial loop (each cell in turn in this process, every core per cell) and as a sweep (cells as Ray tasks, one core each, on a Ray runtime started on this machine), interleaved.

    nice -n 10 python benchmarks/sweep_vs_serial.py --sweep samples/sweep.yaml --repeats 2

Both run the same cells (sparsecc.sweep.run_cell: compile, eval, and simulate for seneca)
from a fresh calibration cache each time, and must give byte-identical models. Repeats go
serial, sweep, sweep, serial, ... so neither always runs first. The sweep's time includes
starting and stopping Ray. On a shared machine the ratio moves with the load: compare rows
of one run only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sparsecc import progress, sweep


def serial(path: Path, out: Path, cache: Path, cores: int) -> float:
    start = time.perf_counter()
    for cell in sweep.load(path, cache):
        record = sweep.run_cell(cell | {"resources": {"num_cpus": cores, "num_gpus": 0}}, str(out))
        if record["status"] != "ok":
            sys.exit(f"{cell['name']}: {record['error']}")
    return time.perf_counter() - start


def swept(path: Path, out: Path, cache: Path, cores: int) -> float:
    start = time.perf_counter()
    report = sweep.run_sweep(path, out, cpus=cores, cache_dir=cache)
    if report["sweep"]["failed"]:
        sys.exit(f"failed cells: {[c for c in report['cells'] if c['status'] != 'ok']}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("samples/sweep.yaml"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved (default 2)")
    args = parser.parse_args()
    progress.set_verbosity(0)
    cores = os.cpu_count() or 1
    cells = sweep.load(args.sweep)
    print(f"python benchmarks/sweep_vs_serial.py --sweep {args.sweep} --repeats {args.repeats}")
    print(f"{len(cells)} cells of {args.sweep}, {cores} cores; load average before: {os.getloadavg()[0]:.1f}")
    times = {"serial": [], "sweep": []}
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        for i in range(args.repeats):
            order = ("serial", "sweep") if i % 2 == 0 else ("sweep", "serial")
            for mode in order:
                out, cache = work / f"{mode}{i}", work / f"cache-{mode}{i}"
                seconds = (serial if mode == "serial" else swept)(args.sweep, out, cache, cores)
                times[mode].append(seconds)
                print(f"  run {i + 1} {mode:6}: {seconds:7.1f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
        for cell in cells:   # the same outputs both ways
            models = {(work / f"{m}0" / "cells" / cell["name"] / "model.onnx").read_bytes() for m in ("serial", "sweep")}
            assert len(models) == 1, f"{cell['name']}: the serial and the swept models differ"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = {mode: sum(t) for mode, t in times.items()}
    print(f"serial loop {total['serial']:.1f} s, sweep {total['sweep']:.1f} s over {args.repeats} run(s) each: "
          f"the sweep takes {total['sweep'] / total['serial']:.2f}x the serial time "
          f"({total['serial'] / total['sweep']:.2f}x faster); models byte-identical")


if __name__ == "__main__":
    main()
