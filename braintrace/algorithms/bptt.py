"""BPTT: the reference. ``scan`` is ``jax.grad`` through ``lax.scan`` (memory O(T))."""

from __future__ import annotations

from .base import Algorithm

__all__ = ["BPTT"]


class BPTT(Algorithm):
    """Backpropagation through time, the exact reference.

    ``learner.scan`` returns the exact gradient of the summed loss over the
    sequence; ``learner.step`` returns the one-step-truncated gradient (the
    reverse pass through one step, with ``h^{t-1}`` held fixed).

    Examples
    --------
    >>> import braintrace as bt
    >>> algo = bt.BPTT()
    """

    name = "bptt"
    online = False
