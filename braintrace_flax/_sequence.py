"""Whole-sequence modules (``nn.RNN``, ``nnx.RNN``): a learner that speaks their layout.

The learner trains the RNN's cell one step at a time; :class:`SequenceLearner` only
moves the time axis, so ``scan`` and ``window`` take and return sequences the way
the RNN does (batch-major ``(batch, time, ...)`` unless ``time_major=True``).
Losses stay one per step, ``(time,)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["SequenceLearner", "time_axis", "check_rnn_options"]


def time_axis(time_major: bool, batched: bool) -> int:
    """Where the time axis of an RNN's inputs is: ``0``, or ``1`` behind a batch axis."""
    return 0 if time_major or not batched else 1


def _move(tree: Any, source: int, destination: int) -> Any:
    if source == destination:
        return tree
    return jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, source, destination), tree)


def check_rnn_options(rnn: Any, who: str) -> None:
    """Refuse the RNN options an online learner cannot follow, saying what to do."""
    if getattr(rnn, "reverse", False):
        raise ValueError(
            f"{who}: the RNN runs backwards in time (reverse=True); an online learner only "
            "runs forwards. Flip the sequences yourself and use reverse=False."
        )


class SequenceLearner:
    """A learner whose ``scan`` / ``window`` use an RNN's sequence layout.

    Wraps the learner of the RNN's cell (``inner``): ``init``, ``step``, ``reset`` and
    ``report`` are the inner learner's; ``scan`` and ``window`` move the time axis of
    ``xs``, ``targets`` and ``outs`` between the RNN's layout and the time-major one
    the inner learner uses. Other attributes (``algorithm``, ``batched``, ...) are the
    inner learner's.

    Parameters
    ----------
    inner : learner
        The cell's learner (``braintrace.Learner`` or the NNX face's ``Learner``).
    axis : int
        The time axis of the RNN's sequences (see :func:`time_axis`).
    """

    def __init__(self, inner: Any, axis: int):
        self.inner = inner
        self.axis = int(axis)

    def __repr__(self) -> str:
        return f"SequenceLearner({self.inner!r}, time_axis={self.axis})"

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def init(self, params: Any, hidden: Any, x: Any, *, key: Any = None):
        """Zero traces for the initial ``hidden`` (``x``: one step's input, for shapes)."""
        return self.inner.init(params, hidden, x, key=key)

    def step(self, params: Any, state: Any, x: Any, target: Any):
        """One time step of the cell: ``((loss, out), grads, state)``."""
        return self.inner.step(params, state, x, target)

    def reset(self, state: Any, mask: Any = None, hidden: Any = None):
        """Start new episodes (the inner learner's ``reset``)."""
        return self.inner.reset(state, mask=mask, hidden=hidden)

    def report(self, params: Any, hidden: Any, x: Any):
        """The compile report of the cell's step."""
        return self.inner.report(params, hidden, x)

    def scan(self, params: Any, state: Any, xs: Any, targets: Any, window: int | None = None):
        """Run over sequences in the RNN's layout: ``((losses, outs), grads, state)``.

        ``outs`` is in the RNN's layout and equals the RNN's own forward pass;
        ``losses`` is ``(time,)``.
        """
        xs, targets = _move((xs, targets), self.axis, 0)
        (losses, outs), grads, state = self.inner.scan(params, state, xs, targets, window=window)
        return (losses, _move(outs, 0, self.axis)), grads, state

    def window(self, params: Any, state: Any, xs: Any, targets: Any):
        """One window of steps, sequences in the RNN's layout (see ``scan``)."""
        xs, targets = _move((xs, targets), self.axis, 0)
        (losses, outs), grads, state = self.inner.window(params, state, xs, targets)
        return (losses, _move(outs, 0, self.axis)), grads, state
