"""One exception type for every problem a user can fix: its message is one line that names
the problem and the fix. The CLI prints it without a traceback and exits non-zero."""
from __future__ import annotations

import re

# C0/C1 control characters (newline, carriage return, NUL, escape, ...) and line separators:
# echoed from a path or a file, they would split the one error line or drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with every control character escaped (`\\n`, `\\x00`): always one printable line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def excerpt(value: object, limit: int = 80) -> str:
    """A bounded repr of `value` for an error message: never longer than `limit` characters
    and never expanding more of a (possibly huge or self-sharing) structure than it shows."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, limit, limit, 40
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = short.maxfrozenset = 4
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SparseccError(Exception):
    """A user-facing error: bad input, impossible request, unmet precondition. Its message
    is kept to one line (control characters escaped)."""

    exit_code = 2

    def __init__(self, message: object = "", *args: object):
        super().__init__(one_line(message), *args)


class PreconditionError(SparseccError):
    """A pass was asked to run on a model it cannot handle (for example, before the pass
    that produces what it needs)."""
