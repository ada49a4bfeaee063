"""How the `sparsecc` process meets SIGINT (Ctrl-C), SIGTERM and SIGHUP (a closed terminal):
the first one unwinds the stack like an exception, so every temporary folder and file is
removed on the way out; any further one is ignored, so a repeated Ctrl-C cannot break into
that cleanup or into the interpreter's exit (where it prints a threading traceback).
Kept free of heavy imports: the entry point installs it before anything else loads."""
from __future__ import annotations

import contextlib
import signal
import threading

NAMES = ("SIGINT", "SIGTERM", "SIGHUP")


_received: int | None = None    # the first signal this process unwound on


def _unwind(signum, frame):
    global _received
    _received = signum
    for name in NAMES:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install(names: tuple[str, ...] = NAMES) -> None:
    """Handle `names` as above (from the main thread only: Python's rule for handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in names:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _unwind)


def exit_code() -> int:
    """128 + the signal the process unwound on (130 for a Ctrl-C that came as KeyboardInterrupt alone)."""
    return 128 + (_received or signal.SIGINT)


@contextlib.contextmanager
def as_interrupt():
    """Re-raise as KeyboardInterrupt an error a library raised in place of a signal's unwinding
    (onnxruntime turns a KeyboardInterrupt inside its own import into ImportError)."""
    try:
        yield
    except Exception:
        if _received is None:
            raise
        raise KeyboardInterrupt from None
