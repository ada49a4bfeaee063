"""numpy's BLAS/LAPACK on one thread, for many small factorizations in a row.

OpenBLAS synchronises its threads inside every LAPACK step; on a machine whose cores are
busy with other work, a 576 x 576 eigendecomposition then takes seconds instead of a
fraction of one (measured here: 2.8 s with 2 threads, 0.28 s with 1, at load 9 on 2 cores).
`one_thread()` sets numpy's OpenBLAS to one thread for a block and restores it after;
where that library cannot be found (another BLAS, no /proc) it changes nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

# (get, set) symbol names of OpenBLAS builds: numpy >= 2 wheels, numpy 1.x wheels, plain builds.
_SYMBOLS = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
            ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
            ("openblas_get_num_threads", "openblas_set_num_threads")]


@functools.lru_cache(maxsize=1)
def _controls() -> tuple:
    """(get, set) of every OpenBLAS loaded into this process."""
    import numpy  # noqa: F401  (loads its BLAS)

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return ()
    paths = sorted({line.split()[-1] for line in maps.read_text().splitlines()
                    if "openblas" in line.split()[-1].lower() and ".so" in line.split()[-1]})
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, set_ in _SYMBOLS:
            if hasattr(lib, get) and hasattr(lib, set_):
                found.append((getattr(lib, get), getattr(lib, set_)))
                break
    return tuple(found)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    controls = _controls()
    saved = [(get(), set_) for get, set_ in controls]
    for _, set_ in controls:
        set_(1)
    try:
        yield
    finally:
        for threads, set_ in saved:
            set_(threads)
