"""SHA-256 of every artifact a fixed set of commands writes on the bundled sample, to check that
a change leaves compiled models, placements, listings, program images and reports
byte-identical: run it before and after (e.g. in a worktree of the old commit) and diff.

    python scripts/artifact_digests.py /tmp/after > /tmp/after.txt
    diff /tmp/before.txt /tmp/after.txt && echo byte-identical

Wall times are left out: timings.json, and the seconds a search reports of its cost (masked in
report.json and report.md). Each run has the calibration cache off, so nothing is shared
between runs or with earlier ones.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "tiny_llama"
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
CALIB = ["--calib", str(DATA / "valid.txt"), "--tokenizer", str(SAMPLE), "--windows", "16", "--seq-len", "64",
         "--no-cache"]
MODEL = str(SAMPLE / "model.onnx")

RUNS = {
    "ort-float": ["compile", MODEL, "--sparsity", "0.5", *CALIB],
    "ort-w8a8": ["compile", MODEL, "--sparsity", "0.5", "--quant", "w8a8", *CALIB],
    "ort-allocate": ["compile", MODEL, "--sparsity", "0.5", "--search", "allocate-sparsity", *CALIB],
    "seneca-float": ["compile", MODEL, "--sparsity", "0.5", "--target", "seneca", *CALIB],
    "seneca-w8a8": ["compile", MODEL, "--sparsity", "0.5", "--quant", "w8a8", "--target", "seneca", *CALIB],
}
AFTER = {   # commands on a compile's output: run name -> (input run, arguments after the input)
    "eval-ort-float": ("ort-float", ["eval", "{in}/model.onnx", "--ppl", str(DATA / "test.txt"), "--windows", "8",
                                     "--seq-len", "64", "--tokenizer", str(SAMPLE)]),
    "simulate-seneca-float": ("seneca-float", ["simulate", "{in}", "--text", str(DATA / "test.txt"), "--tokens", "16"]),
    "simulate-seneca-w8a8": ("seneca-w8a8", ["simulate", "{in}", "--text", str(DATA / "test.txt"), "--tokens", "16"]),
}


def sparsecc(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "sparsecc.cli", *args, "-q"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"sparsecc {' '.join(args)} failed: {done.stderr.strip()}")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    for name, args in RUNS.items():
        sparsecc([*args, "-o", str(root / name)])
    for name, (source, args) in AFTER.items():
        sparsecc([a.replace("{in}", str(root / source)) for a in args] + ["-o", str(root / name)])
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "timings.json"):
        text = path.read_bytes().replace(str(root).encode(), b"<out>")   # reports name their own folder
        if path.name in ("report.json", "report.md"):
            text = re.sub(rb'"seconds": [0-9.]+|[0-9.]+ s\.', b"<seconds>", text)
        print(f"{hashlib.sha256(text).hexdigest()}  {path.relative_to(root)}")


if __name__ == "__main__":
    main()
