"""The references: BPTT (exact, memory O(T)) and the one-step gradient (no traces)."""

from __future__ import annotations

from .base import Algorithm

__all__ = ["BPTT", "OneStep"]


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


class OneStep(Algorithm):
    """The one-step-truncated gradient with no traces: the control for what traces add.

    Every step returns only the reverse pass through that step (``h^{t-1}`` held
    fixed); ``learner.scan`` sums those, with memory independent of ``T``. Readouts
    get their exact gradient, every recurrent parameter only its truncated one.

    Examples
    --------
    >>> import braintrace as bt
    >>> algo = bt.OneStep()
    """

    name = "one_step"
