"""Progress and logging on stderr, so stdout carries results only.

`set_verbosity` is called once by the CLI: -q silences progress and logs, -v adds detail.
Progress bars (tqdm) show rate and ETA when stderr is a terminal.
"""
from __future__ import annotations

import sys

_level = 1  # 0 quiet, 1 normal, 2 verbose


def set_verbosity(level: int) -> None:
    global _level
    _level = level


def log(message: str, level: int = 1) -> None:
    if _level >= level:
        print(message, file=sys.stderr, flush=True)


def bar(iterable, total: int | None = None, desc: str = ""):
    """Wrap `iterable` in a progress bar with ETA (silent when quiet or not on a terminal)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr, leave=False,
                disable=True if _level == 0 else None, dynamic_ncols=True)
