"""An out-of-domain English text for the SmolLM2 benchmarks: Debian's `fortunes` data files
(quotations, jokes and aphorisms; not Wikipedia), fetched with `apt-get download` from the
Debian archive, unpacked with `dpkg -x`, the `%` separators turned into blank lines, and cached
in build/ood/fortunes.txt. ascii-art is left out (it is pictures, not prose).

    python benchmarks/ood_text.py            # prints the path (downloads once)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHED = REPO / "build" / "ood" / "fortunes.txt"
PACKAGE = "fortunes"
SKIP = {"ascii-art", "art"}


def fortunes_text(path: Path = CACHED) -> Path:
    """The text file (made once)."""
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        run = lambda *cmd: subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, text=True)
        try:
            run("apt-get", "download", PACKAGE)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"cannot fetch Debian's {PACKAGE} package ({exc}); pass --ood TEXT instead")
        deb = next(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        run("dpkg", "-x", str(deb), "root")
        folder = Path(tmp) / "root" / "usr" / "share" / "games" / "fortunes"
        parts = []
        for file in sorted(folder.iterdir()):
            if file.suffix or file.is_symlink() or file.name in SKIP:
                continue   # .dat indexes, .u8 links
            text = file.read_text(encoding="utf-8", errors="replace")
            parts.append("\n\n".join(p.strip() for p in text.split("\n%\n") if p.strip()))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = path.with_suffix(".tmp")
        tmp_file.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        tmp_file.replace(path)
    return path


if __name__ == "__main__":
    print(fortunes_text(Path(sys.argv[1]) if len(sys.argv) > 1 else CACHED))
