"""The compiler's error and warning types."""


class CompileError(ValueError):
    """A step function that braintrace cannot compile; the message says how to fix it."""


class TruncationWarning(UserWarning):
    """Some parameters reach the hidden state but have no eligibility trace.

    Their gradient is only the one-step (or in-window) part: see the compile
    report's ``gradient`` column and ``docs/algorithms.md``, "Exactness classes".
    Compile with ``strict=True`` to make this an error instead.
    """
