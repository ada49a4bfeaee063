"""One exception type for every problem a user can fix: its message is one line that names
the problem and the fix. The CLI prints it without a traceback and exits non-zero."""


class SparseccError(Exception):
    """A user-facing error: bad input, impossible request, unmet precondition."""

    exit_code = 2


class PreconditionError(SparseccError):
    """A pass was asked to run on a model it cannot handle (for example, before the pass
    that produces what it needs)."""
