"""The references: the one-step gradient with no traces, and BPTT (one window over everything)."""

from __future__ import annotations

from ..compiler.report import EXACT, ONE_STEP, TRUNCATED
from .base import Algorithm

__all__ = ["BPTT", "OneStep"]


class OneStep(Algorithm):
    """The one-step-truncated gradient with no traces: the control for what traces add.

    Every step returns only the reverse pass through that step (``h^{t-1}`` held
    fixed); ``learner.scan`` sums those, with memory independent of ``T``. Readouts
    get their exact gradient, every recurrent parameter only its truncated one. With
    ``learner.scan(..., window=k)`` it is truncated BPTT over windows of ``k`` steps
    (TBPTT-k).

    Examples
    --------
    >>> import braintrace as bt
    >>> algo = bt.OneStep()
    """

    name = "one_step"

    def describe(self, report, graph):
        reason = "OneStep: no trace; only its one-step (or in-window) gradient"
        return report.retrained(ONE_STEP, TRUNCATED, reason)


class BPTT(Algorithm):
    """Backpropagation through time, the exact reference.

    BPTT keeps no traces; it runs a whole sequence as ONE window, so
    ``learner.scan`` returns the exact gradient of the summed loss (memory O(T)).
    ``learner.step`` returns the one-step-truncated gradient (the reverse pass
    through one step, with ``h^{t-1}`` held fixed), and ``scan(..., window=k)``
    plain BPTT over each window (truncated BPTT).

    Examples
    --------
    >>> import braintrace as bt
    >>> bt.BPTT().window_length(50)
    50
    """

    name = "bptt"

    def window_length(self, num_steps: int) -> int | None:
        return num_steps

    def describe(self, report, graph):
        reason = "BPTT: scan differentiates the whole sequence (window=k: truncated BPTT)"
        return report.retrained(ONE_STEP, EXACT, reason)
