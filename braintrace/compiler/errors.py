"""The compiler's error type."""


class CompileError(ValueError):
    """A step function that braintrace cannot compile; the message says how to fix it."""
