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

from braintrace.algorithms.face import FaceLearner

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
        """Zero traces for the initial ``hidden``.

        ``x`` is one step's input, for shapes; a whole sequence in the RNN's layout
        (what the RNN itself is called on) is accepted too, and its first step used.
        """
        return self.inner.init(params, hidden, self.step_input(params, hidden, x, "init"), key=key)

    def step(self, params: Any, state: Any, x: Any, target: Any, *, active: Any = None):
        """One time step of the cell: ``((loss, out), grads, state)``."""
        return self.inner.step(params, state, x, target, active=active)

    def reset(self, state: Any, mask: Any = None, hidden: Any = None):
        """Start new episodes (the inner learner's ``reset``)."""
        return self.inner.reset(state, mask=mask, hidden=hidden)

    def report(self, params: Any, hidden: Any, x: Any):
        """The compile report of the cell's step (``x`` as for :meth:`init`)."""
        return self.inner.report(params, hidden, self.step_input(params, hidden, x, "report"))

    def scan(
        self,
        params: Any,
        state: Any,
        xs: Any,
        targets: Any,
        window: int | None = None,
        *,
        active: Any = None,
    ):
        """Run over sequences in the RNN's layout: ``((losses, outs), grads, state)``.

        ``outs`` is in the RNN's layout and equals the RNN's own forward pass;
        ``losses`` is ``(time,)``. ``active`` (padded steps, see
        ``braintrace.Learner.scan``) is ``(batch, time)`` in the RNN's layout too.
        """
        xs, targets, active = _move((xs, targets, active), self.axis, 0)
        (losses, outs), grads, state = self.inner.scan(
            params, state, xs, targets, window=window, active=active
        )
        return (losses, _move(outs, 0, self.axis)), grads, state

    def window(self, params: Any, state: Any, xs: Any, targets: Any, *, active: Any = None):
        """One window of steps, sequences in the RNN's layout (see ``scan``)."""
        xs, targets, active = _move((xs, targets, active), self.axis, 0)
        (losses, outs), grads, state = self.inner.window(params, state, xs, targets, active=active)
        return (losses, _move(outs, 0, self.axis)), grads, state

    def step_input(self, params: Any, hidden: Any, x: Any, what: str) -> Any:
        """``x`` if it is one step's input for the cell, else the first step of the
        sequence ``x`` (in the RNN's layout); a clear error if it is neither."""
        step, values = _cell_step(self.inner, params, what)
        problem = _keeps_carry(step, values, hidden, x)
        if problem is None:
            return x
        leaves = jax.tree_util.tree_leaves(x)
        if leaves and all(jnp.ndim(a) > self.axis for a in leaves):
            first = jax.tree_util.tree_map(lambda a: jnp.take(a, 0, axis=self.axis), x)
            if _keeps_carry(step, values, hidden, first) is None:
                return first
        shapes = [tuple(jnp.shape(a)) for a in leaves]
        raise ValueError(
            f"braintrace_flax SequenceLearner.{what}: x must be one step's input of the RNN's "
            f"cell, e.g. xs[:, 0] for batch-major sequences xs (or the whole sequence, in the "
            f"RNN's layout, time axis {self.axis}); got leaves of shapes {shapes}, with which "
            f"the cell's step fails: {problem}"
        )


def _cell_step(inner: Any, params: Any, what: str) -> tuple:
    """The cell's core step function and the values it takes (``params``, or the
    trained arrays of an NNX model)."""
    if isinstance(inner, FaceLearner):
        core, values, _ = inner.core_of(params, what)
        return core.step_fn, values
    return inner.step_fn, params


def _keeps_carry(step: Any, params: Any, hidden: Any, x: Any) -> str | None:
    """``None`` if ``step(params, hidden, x)`` runs and returns a carry shaped like
    ``hidden``; otherwise what went wrong."""
    try:
        new_hidden, _ = jax.eval_shape(step, params, hidden, x)
    except Exception as error:  # noqa: BLE001 - any failure means: not one step's input
        return f"{type(error).__name__}: {error}".splitlines()[0]
    want = [tuple(jnp.shape(a)) for a in jax.tree_util.tree_leaves(hidden)]
    got = [tuple(a.shape) for a in jax.tree_util.tree_leaves(new_hidden)]
    if want != got:
        return f"it returns a carry of shapes {got}, not the carry's {want}"
    return None
