"""The learner: one optax-like face over D-RTRL, pp_prop, OneStep and BPTT.

Per step it returns, for every ``params`` leaf, the exact one-step reverse pass plus
the trace credit ``<dl_t/dh^{t-1}, eps^{t-1}>`` for trace-trained leaves; a window of
``k`` steps generalises it (``docs/algorithms.md``, "The learning signal" and
"Windows").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ..compiler import CompileError, compile_graph
from ..compiler.errors import TruncationWarning
from ..compiler.report import CompileReport
from ..user_frame import warn_at_user
from . import checks
from .base import Algorithm, LearnerState
from .engine import Problem, run_window

__all__ = ["Learner", "compile"]

_tree_map = jax.tree_util.tree_map


class Learner:
    """A compiled online learner; create it with :func:`braintrace.compile`.

    Methods mirror an optax-style loop: :meth:`init` once, then :meth:`step` per
    time step, :meth:`window` per chunk of steps, or :meth:`scan` over a sequence;
    :meth:`reset` at episode boundaries. Every method is a pure function of its
    arguments, so it can be ``jax.jit``-ed, ``jax.vmap``-ed and used inside the
    caller's own ``lax.scan``. Jit it: an eager step runs op by op.
    """

    def __init__(
        self,
        step_fn: Callable,
        loss_fn: Callable,
        algorithm: Algorithm,
        *,
        batched: bool = True,
        strict: bool = False,
    ):
        checks.check_algorithm(algorithm, "braintrace.compile")
        if not callable(step_fn) or not callable(loss_fn):
            raise TypeError("braintrace.compile: step_fn and loss_fn must be callable.")
        self.step_fn = step_fn
        self.loss_fn = loss_fn
        self.algorithm = algorithm
        self.batched = bool(batched)
        self.strict = bool(strict)
        self._warned: set = set()

    def __repr__(self) -> str:
        return f"Learner({self.algorithm!r}, batched={self.batched}, strict={self.strict})"

    # -- compile-time views ------------------------------------------------------------
    def graph(self, params, hidden, x):
        """The compiled eligibility-trace graph for these argument shapes.

        With ``strict=True`` a graph with truncated parameters raises
        :class:`~braintrace.CompileError`.
        """
        graph = compile_graph(self.step_fn, params, hidden, x, batched=self.batched)
        report = self.algorithm.describe(graph.report, graph)
        message = report.truncation_message() if self.algorithm.traced else None
        if message and self.strict:
            raise CompileError(message + " (strict=True)")
        if self.algorithm.traced:
            self.algorithm.validate(graph, jax.tree_util.tree_leaves(params))
        return graph

    def report(self, params, hidden, x) -> CompileReport:
        """The compile report: how every parameter is trained under this learner's
        algorithm, and why, with its trace memory per sample (print it)."""
        graph = compile_graph(self.step_fn, params, hidden, x, batched=self.batched)
        leaves = jax.tree_util.tree_leaves(params)
        memory = ((self.algorithm.name, self.algorithm.trace_bytes(graph, leaves)),)
        per_op = tuple(sorted(self.algorithm.op_trace_bytes(graph, leaves).items()))
        report = self.algorithm.describe(graph.report, graph)
        return dataclasses.replace(report, trace_memory=memory, op_trace_memory=per_op)

    # -- state ----------------------------------------------------------------------------
    def init(self, params, hidden, x, *, key=None) -> LearnerState:
        """Zero traces for ``hidden`` as the initial carry (``x``: one step's input).

        ``key`` (``jax.random.key(i)``) seeds an algorithm that draws random numbers
        (``braintrace.UORO``; without it, a fixed default); the others ignore it.
        Warns once per learner and argument shapes (:class:`~braintrace.TruncationWarning`)
        when some parameter's gradient is truncated, listing each and why.
        """
        checks.check_batch(self.batched, hidden, x, None, "init")
        count = jnp.zeros(checks.batch_shape(self.batched, hidden), jnp.int32)
        if not self.algorithm.traced:
            return LearnerState(hidden, self.algorithm.init_traces(None, []), count)
        graph = self.graph(params, hidden, x)
        self._warn_once(graph, params, hidden, x)
        traces = self.algorithm.init_traces(graph, jax.tree_util.tree_leaves(params), key=key)
        return LearnerState(hidden, traces, count)

    def _warn_once(self, graph, params, hidden, x) -> None:
        message = self.algorithm.describe(graph.report, graph).truncation_message()
        key = checks.signature(params, hidden, x)
        if message and key not in self._warned:
            self._warned.add(key)
            warn_at_user(message, TruncationWarning)

    def reset(self, state: LearnerState, mask=None, hidden=None) -> LearnerState:
        """Start new episodes: fresh hidden state, zero traces and counts, per sample.

        Parameters
        ----------
        state : LearnerState
        mask : bool array, optional
            Which samples restart: shape ``(B,)`` when batched, a scalar otherwise;
            ``None`` restarts all.
        hidden : pytree, optional
            The new hidden state, like ``state.hidden`` (default: zeros).

        Returns
        -------
        LearnerState
            Selected samples get ``hidden`` and zero traces and count, by selection
            (``where``), so a NaN or Inf in their old state cannot leak into the new
            one; the other samples are bit-identical to ``state``.
        """
        checks.check_state(state)
        fresh = checks.fresh_state(state, hidden, self.algorithm)
        if mask is None:
            return fresh
        mask = checks.check_mask(self.batched, state, mask)

        def pick(new, old):
            return jnp.where(mask.reshape(mask.shape + (1,) * (old.ndim - mask.ndim)), new, old)

        return _tree_map(pick, fresh, state)

    # -- the loss of one step -------------------------------------------------------------
    def _loss(self, out, target, active=None):
        """One step's loss (the batch mean); a padded sample's (``active`` false) is 0."""
        if not self.batched:
            loss = self.loss_fn(out, target)
            checks.check_scalar(loss, "loss_fn(out, target)")
            return loss if active is None else jnp.where(active, loss, jnp.zeros_like(loss))
        checks.check_loss_batch(out, target)
        losses = jax.vmap(self.loss_fn)(out, target)
        checks.check_scalar(losses, "loss_fn(out, target) for one sample", batched=True)
        if active is not None:
            losses = jnp.where(active, losses, jnp.zeros_like(losses))
        return losses.mean()

    def _problem(self, params, state, x, padded: bool = False) -> Problem:
        """The window's problem; with ``padded`` its targets are ``(targets, active)``."""
        graph = None
        if self.algorithm.traced:
            graph = self.graph(params, state.hidden, x)
            checks.check_traces(self.algorithm, graph, params, state)
        loss = (lambda out, pair: self._loss(out, *pair)) if padded else self._loss
        return Problem(self.step_fn, loss, self.algorithm, graph)

    # -- stepping -------------------------------------------------------------------------
    def step(self, params, state: LearnerState, x, target, *, active=None):
        """One time step: ``((loss, out), grads, new_state)``.

        ``grads`` has the structure of ``params``: the exact one-step reverse pass
        plus, for trace-trained leaves, the credit ``<dl_t/dh^{t-1}, eps^{t-1}>``.
        ``active`` (optional, bool, shape ``(B,)``; a scalar unbatched): where false,
        the step is padding for that sample (see :meth:`scan`).
        """
        checks.check_state(state)
        checks.check_batch(self.batched, state.hidden, x, state.count, "step")
        active = checks.check_active(active, state.count, (), "step")
        problem = self._problem(params, state, x, padded=active is not None)
        target = target if active is None else (target, active)
        return run_window(problem, params, state, x, target, single=True, active=active)

    def window(self, params, state: LearnerState, xs, targets, *, active=None):
        """One window of ``len(xs)`` steps: ``((losses, outs), grads, new_state)``.

        Exact inside the window (one reverse pass through its steps) plus the trace
        credit ``<dL_W/dh^{t0-1}, eps^{t0-1}>`` for before it; the traces are then
        advanced over the window. Call it on every chunk of a stream for online
        learning with memory O(window), independent of the stream's length.
        ``xs`` and ``targets`` are time-major; ``active``, optional, marks padded
        steps (see :meth:`scan`). An empty window (``T = 0``) returns empty losses
        and outputs, zero gradients and ``state`` unchanged.
        """
        checks.check_state(state)
        length = checks.check_time_major(xs, targets)
        active = checks.check_active(active, state.count, (length,), "window")
        if length == 0:
            return self._empty(params, state, xs, targets)
        x0 = _tree_map(lambda a: a[0], xs)
        checks.check_batch(self.batched, state.hidden, x0, state.count, "window")
        problem = self._problem(params, state, x0, padded=active is not None)
        targets = targets if active is None else (targets, active)
        return run_window(problem, params, state, xs, targets, single=False, active=active)

    def scan(
        self, params, state: LearnerState, xs, targets, window: int | None = None, *, active=None
    ):
        """Run over a time-major sequence: ``((losses, outs), grads, final_state)``.

        ``grads`` is the sum of the gradients of consecutive windows of ``window``
        steps (a shorter last window when it does not divide ``T``; a ``window``
        longer than ``T`` is one window of ``T`` steps); ``window=None`` uses the
        algorithm's default: one step for the online algorithms and ``OneStep``, the
        whole sequence for ``BPTT`` (the exact gradient of the summed loss). Memory
        grows with the window, never with ``T``. ``T = 0`` returns empty losses and
        outputs, zero gradients and ``state`` unchanged.

        ``active`` (optional) is a bool array ``(T, B)`` (``(T,)`` unbatched) for a
        ragged batch: where ``active[t, b]`` is false, step ``t`` is padding for
        sample ``b``: its loss counts as zero and the sample's hidden state, traces
        and count stay as they were (by selection; pad with finite values). So a
        sample that ended keeps its end state, and its padded steps add nothing to
        ``grads`` (the loss is still the mean over all ``B`` samples;
        ``docs/algorithms.md``, "Padded steps").
        """
        checks.check_state(state)
        length = checks.check_time_major(xs, targets)
        active = checks.check_active(active, state.count, (length,), "scan")
        checks.check_window(window)
        if length == 0:
            return self._empty(params, state, xs, targets)
        k = self.algorithm.window_length(length) if window is None else min(window, length)
        if k is None or k == 1:
            return self._scan_windows(params, state, (xs, targets, active), 1, single=True)
        return self._scan_windows(params, state, (xs, targets, active), k, single=False)

    def _empty(self, params, state, xs, targets):
        """No step: empty ``(losses, outs)``, zero gradients and ``state`` as it is."""
        first = _tree_map(lambda a: jnp.zeros(a.shape[1:], a.dtype), (xs, targets))
        per_step = jax.eval_shape(lambda: self.step(params, state, *first)[0])
        empty = _tree_map(lambda s: jnp.zeros((0,) + s.shape, s.dtype), per_step)
        return empty, _tree_map(jnp.zeros_like, params), state

    def _scan_windows(self, params, state, sequence, k: int, single: bool):
        xs, targets, _ = sequence
        length = jax.tree_util.tree_leaves(xs)[0].shape[0]
        n_full, rest = divmod(length, k)
        run = self.step if single else self.window
        # Each window is read in place (slicing the sequence first would copy it). With
        # a short last window the per-step outputs go straight into their final
        # buffers (concatenating would copy them): memory stays O(window) besides them.
        buffers = self._output_buffers(params, state, xs, targets) if rest else None

        def body(carry, _):
            index, st, acc, bufs = carry
            start = index * k  # a counter, not an array of starts: that would be O(T)
            x, t, a = _tree_map(lambda v: lax.dynamic_slice_in_dim(v, start, k), sequence)
            if single:
                x, t, a = _tree_map(lambda v: v[0], (x, t, a))
            outputs, grads, st = run(params, st, x, t, active=a)
            if bufs is not None:
                bufs, outputs = _write_at(bufs, outputs, start, single), None
            return (index + 1, st, _tree_map(jnp.add, acc, grads), bufs), outputs

        zero = _tree_map(jnp.zeros_like, params)
        carry = (jnp.zeros((), jnp.int32), state, zero, buffers)
        (_, state, grads, buffers), stacked = lax.scan(body, carry, None, length=n_full)
        if not rest:
            flat = (lambda a: a) if single else (lambda a: a.reshape((length,) + a.shape[2:]))
            return _tree_map(flat, stacked), grads, state
        x, t, a = _tree_map(lambda v: v[n_full * k :], sequence)
        outputs, t_grads, state = self.window(params, state, x, t, active=a)
        buffers = _write_at(buffers, outputs, n_full * k, False)
        return buffers, _tree_map(jnp.add, grads, t_grads), state

    def _output_buffers(self, params, state, xs, targets):
        """Zeros for every step's ``(loss, out)`` over the whole sequence."""
        first = _tree_map(lambda a: a[0], (xs, targets))
        per_step = jax.eval_shape(lambda: self.step(params, state, *first)[0])
        length = jax.tree_util.tree_leaves(xs)[0].shape[0]
        return _tree_map(lambda s: jnp.zeros((length,) + s.shape, s.dtype), per_step)


def _write_at(buffers, outputs, start, single: bool):
    """``outputs`` (one step's, or a window's time-major) written into ``buffers`` at ``start``."""
    if single:
        outputs = _tree_map(lambda a: a[None], outputs)
    return _tree_map(lambda b, v: lax.dynamic_update_slice_in_dim(b, v, start, 0), buffers, outputs)


def compile(
    step_fn: Callable,
    loss_fn: Callable,
    algorithm: Algorithm,
    *,  # noqa: A001
    batched: bool = True,
    strict: bool = False,
) -> Learner:
    """Compile a step function and a loss into an online learner.

    Parameters
    ----------
    step_fn : callable
        ``step_fn(params, hidden, x) -> (new_hidden, out)``.
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    algorithm : Algorithm
        ``braintrace.D_RTRL()``, ``braintrace.ES_D_RTRL(...)`` (alias ``pp_prop``),
        ``braintrace.OneStep()`` or ``braintrace.BPTT()``.
    batched : bool
        ``True`` (the default, as in the Flax and Equinox faces) when ``x``, every
        ``hidden`` leaf and ``target`` carry a leading batch axis; the per-step loss is
        then the batch mean of ``loss_fn``. ``False`` for one sample (vmap the learner
        over sequences, or write the step for one sample).
    strict : bool
        Raise :class:`~braintrace.CompileError` instead of warning
        (:class:`~braintrace.TruncationWarning`) when a parameter's gradient would be
        truncated (``docs/algorithms.md``, "Exactness classes").

    Returns
    -------
    Learner

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace as bt
    >>> from braintrace import ops
    >>> def step(p, h, x):
    ...     h = 0.9 * h + ops.dense(x, p['w'])
    ...     return h, h @ p['r']
    >>> loss = lambda out, y: jnp.sum((out - y) ** 2)
    >>> learner = bt.compile(step, loss, bt.D_RTRL(), batched=False)
    >>> params = {'w': jnp.ones((3, 4)) * 0.1, 'r': jnp.ones((4, 2))}
    >>> state = learner.init(params, jnp.zeros(4), jnp.zeros(3))
    >>> (l, out), grads, state = learner.step(params, state, jnp.ones(3), jnp.zeros(2))
    >>> jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    True
    """
    return Learner(step_fn, loss_fn, algorithm, batched=batched, strict=strict)
