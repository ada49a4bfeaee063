"""Progress and logging on stderr, so stdout carries results only.

`set_verbosity` is called once by the CLI: -q (and --json) silence progress and logs, -v adds
detail. Progress bars (tqdm) show rate and ETA when stderr is a terminal; every long loop
(calibration, the searches, evaluation, simulation) runs under one, with its total known.
"""
from __future__ import annotations

import sys

_level = 1  # 0 quiet, 1 normal, 2 verbose


def set_verbosity(level: int) -> None:
    global _level
    _level = level


def quiet() -> bool:
    return _level == 0


def log(message: str, level: int = 1) -> None:
    """A line on stderr; written above any progress bar on screen instead of through it."""
    if _level >= level:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


def bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "batch"):
    """Wrap `iterable` in a progress bar with ETA (silent when quiet or not on a terminal).
    Without an iterable, a bar of `total` steps advanced with `.update(n)`."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=True if _level == 0 else None, dynamic_ncols=True)
