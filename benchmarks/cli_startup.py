"""Start-up time of the CLI's quick answers: --version, --help, compile --help, a usage error.

    python benchmarks/cli_startup.py --peer /work/venv/bin/sparsecc     # this checkout vs another install

Runs each command --repeat times as a subprocess of this checkout's `sparsecc` (the one on
PATH beside this Python), of the --peer executable (e.g. an install of the main branch), and
`python -c pass` (the interpreter's own start-up, the floor), and prints the median wall
time and the median CPU time (user + system, from wait4: on a busy machine wall time also
counts waiting for a core).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {"--version": ["--version"], "--help": ["--help"], "compile --help": ["compile", "--help"],
            "usage error": ["compile", "m.onnx", "-o", "x", "--calb", "v.txt"]}


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", type=Path, help="another sparsecc executable to compare with")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)

    ours = Path(sys.executable).with_name("sparsecc")
    runs = {"this checkout": [str(ours)]} | ({f"peer {args.peer}": [str(args.peer)]} if args.peer else {})
    print(f"median of {args.repeat} runs: wall s / CPU s")
    floor = [timed([sys.executable, "-c", "pass"]) for _ in range(args.repeat)]
    print(f"{'python -c pass':>16}: {statistics.median(w for w, _ in floor):.3f} / {statistics.median(c for _, c in floor):.3f}")
    print(f"{'':>16}  " + "  ".join(f"{name:>28}" for name in runs))
    for label, command in COMMANDS.items():
        cells = []
        for exe in runs.values():
            times = [timed(exe + command) for _ in range(args.repeat)]
            cells.append(f"{statistics.median(w for w, _ in times):.3f} / {statistics.median(c for _, c in times):.3f}")
        print(f"{label:>16}: " + "  ".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
