"""The learner: one optax-like face over D-RTRL, pp_prop and BPTT.

Per step it returns DESIGN.md 3.1's gradient for every ``params`` leaf:

    G_t = dl_t/dparams |_(h^{t-1} fixed)                 (one reverse pass, exact)
        + sum over relations <dl_t/dh^{t-1}, eps^{t-1}>   (trace credit for the past)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ..compiler import CompileError, compile_graph
from ..compiler.report import CompileReport
from .base import Algorithm, LearnerState, OnlineAlgorithm, stack_group

__all__ = ["Learner", "compile"]

_tree_map = jax.tree_util.tree_map


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _split_float(tree):
    """Flat leaves, the indices of the floating ones, and the treedef."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return leaves, [i for i, a in enumerate(leaves) if _is_float(a)], treedef


def _with(leaves, idx, values):
    out = list(leaves)
    for i, v in zip(idx, values):
        out[i] = v
    return out


class Learner:
    """A compiled online learner; create it with :func:`braintrace.compile`.

    Methods mirror an optax-style loop: :meth:`init` once, then :meth:`step` per
    time step (or :meth:`scan` over a sequence). Every method is a pure function of
    its arguments, so it can be ``jax.jit``-ed, ``jax.vmap``-ed and used inside the
    caller's own ``lax.scan``. Jit it: an eager step runs op by op (about half a
    second for a small GRU on CPU, against well under a millisecond jitted).
    """

    def __init__(self, step_fn: Callable, loss_fn: Callable, algorithm: Algorithm, *,
                 batched: bool = False):
        if isinstance(algorithm, type) and issubclass(algorithm, Algorithm):
            raise TypeError(
                f"braintrace.compile: pass an algorithm instance, e.g. {algorithm.__name__}(), "
                "not the class."
            )
        if not isinstance(algorithm, Algorithm):
            raise TypeError(
                "braintrace.compile: algorithm must be braintrace.D_RTRL(), "
                "braintrace.ES_D_RTRL(...) / pp_prop(...), braintrace.BPTT() or "
                f"braintrace.OneStep(); got {algorithm!r}."
            )
        if not callable(step_fn) or not callable(loss_fn):
            raise TypeError("braintrace.compile: step_fn and loss_fn must be callable.")
        self.step_fn = step_fn
        self.loss_fn = loss_fn
        self.algorithm = algorithm
        self.batched = bool(batched)

    def __repr__(self) -> str:
        return f"Learner({self.algorithm!r}, batched={self.batched})"

    # -- compile-time views ------------------------------------------------------------
    def graph(self, params, hidden, x):
        """The compiled eligibility-trace graph for these argument shapes."""
        return compile_graph(self.step_fn, params, hidden, x, batched=self.batched)

    def report(self, params, hidden, x) -> CompileReport:
        """The compile report: how every parameter is trained (print it)."""
        return self.graph(params, hidden, x).report

    # -- state ----------------------------------------------------------------------------
    def init(self, params, hidden, x) -> LearnerState:
        """Zero traces for ``hidden`` as the initial carry (``x``: one step's input)."""
        if isinstance(self.algorithm, OnlineAlgorithm):
            graph = self.graph(params, hidden, x)
            traces = self.algorithm.init_traces(graph, jax.tree_util.tree_leaves(params))
        else:
            traces = ()
        return LearnerState(hidden, traces, jnp.zeros((), jnp.int32))

    # -- the loss of one step -------------------------------------------------------------
    def _loss(self, out, target):
        if not self.batched:
            loss = self.loss_fn(out, target)
            _check_scalar(loss, "loss_fn(out, target)")
            return loss
        sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None
                 for a in jax.tree_util.tree_leaves((out, target))}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                "braintrace learner (batched=True): out and target must share one leading "
                f"batch axis; got leading sizes {sorted(map(str, sizes))}. Pass a target with "
                "the batch axis first."
            )
        losses = jax.vmap(self.loss_fn)(out, target)
        _check_scalar(losses, "loss_fn(out, target) for one sample", batched=True)
        return losses.mean()

    # -- one step ---------------------------------------------------------------------------
    def step(self, params, state: LearnerState, x, target):
        """One time step: ``((loss, out), grads, new_state)``.

        ``grads`` has the structure of ``params``: the exact one-step reverse pass
        plus, for trace-trained leaves, the credit ``<dl_t/dh^{t-1}, eps^{t-1}>``.
        """
        _check_state(state)
        p_leaves, p_float, p_def = _split_float(params)
        h_leaves, h_float, h_def = _split_float(state.hidden)

        def loss_of(pf, hf):
            p = jax.tree_util.tree_unflatten(p_def, _with(p_leaves, p_float, pf))
            h = jax.tree_util.tree_unflatten(h_def, _with(h_leaves, h_float, hf))
            result = self.step_fn(p, h, x)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise CompileError("the step must return (new_hidden, out).")
            new_h, out = result
            return self._loss(out, target), (new_h, out)

        pf = [p_leaves[i] for i in p_float]
        hf = [h_leaves[i] for i in h_float]
        loss, vjp_fn, (new_h, out) = jax.vjp(loss_of, pf, hf, has_aux=True)
        g_pf, g_hf = vjp_fn(jnp.ones_like(loss))
        grad_leaves = [jnp.zeros_like(a) for a in p_leaves]
        grad_leaves = _with(grad_leaves, p_float, g_pf)

        traces = state.traces
        if isinstance(self.algorithm, OnlineAlgorithm):
            graph = self.graph(params, state.hidden, x)
            signal_leaves = _with([None] * len(h_leaves), h_float, g_hf)
            signals = {g: stack_group(graph, g, signal_leaves)
                       for g in {r.group for r in graph.relations}}
            credit = self.algorithm.credit(graph, p_leaves, traces, signals, state.count)
            for leaf, value in credit.items():
                grad_leaves[leaf] = grad_leaves[leaf] + value.astype(grad_leaves[leaf].dtype)
            parts = graph.parts(params, state.hidden, x)
            traces = self.algorithm.update(graph, p_leaves, traces, parts, state.count)
        grads = jax.tree_util.tree_unflatten(p_def, grad_leaves)
        return (loss, out), grads, LearnerState(new_h, traces, state.count + 1)

    # -- a sequence -------------------------------------------------------------------------
    def scan(self, params, state: LearnerState, xs, targets):
        """Run over a time-major sequence: ``((losses, outs), grads, final_state)``.

        For the online algorithms ``grads`` is the sum of the per-step gradients,
        accumulated in the scan carry (memory independent of ``T``). For BPTT it is
        the exact gradient of the summed loss.
        """
        _check_state(state)
        _check_time_major(xs, targets)
        if not self.algorithm.online:
            return self._bptt_scan(params, state, xs, targets)

        def body(carry, inputs):
            st, acc = carry
            (loss, out), grads, st = self.step(params, st, *inputs)
            return (st, _tree_map(jnp.add, acc, grads)), (loss, out)

        zero = _tree_map(jnp.zeros_like, params)
        (state, grads), (losses, outs) = lax.scan(body, (state, zero), (xs, targets))
        return (losses, outs), grads, state

    def _bptt_scan(self, params, state, xs, targets):
        def total(p):
            def body(h, inputs):
                x, target = inputs
                new_h, out = self.step_fn(p, h, x)
                return new_h, (self._loss(out, target), out)

            h_final, (losses, outs) = lax.scan(body, state.hidden, (xs, targets))
            return losses.sum(), (h_final, losses, outs)

        (_, (h_final, losses, outs)), grads = jax.value_and_grad(total, has_aux=True)(params)
        n = jax.tree_util.tree_leaves(xs)[0].shape[0]
        return (losses, outs), grads, LearnerState(h_final, state.traces, state.count + n)


def _check_scalar(value, what, batched=False):
    shape = tuple(jnp.shape(value))
    per_sample = shape[1:] if batched else shape
    if per_sample != ():
        raise ValueError(
            f"braintrace learner: {what} must return a scalar, got shape {per_sample}. Reduce "
            "the per-sample loss to a scalar (e.g. .sum() or .mean())."
        )


def _check_state(state):
    if not isinstance(state, LearnerState):
        raise TypeError(
            "braintrace learner: state must be the LearnerState returned by learner.init(...) "
            f"or learner.step(...), got {type(state).__name__}."
        )


def _check_time_major(xs, targets):
    lengths = {jnp.shape(a)[0] if jnp.ndim(a) else None
               for a in jax.tree_util.tree_leaves((xs, targets))}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            "braintrace learner.scan: xs and targets must be time-major with one shared "
            f"leading time axis; got leading sizes {sorted(map(str, lengths))}."
        )


def compile(step_fn: Callable, loss_fn: Callable, algorithm: Algorithm, *,  # noqa: A001
            batched: bool = False) -> Learner:
    """Compile a step function and a loss into an online learner.

    Parameters
    ----------
    step_fn : callable
        ``step_fn(params, hidden, x) -> (new_hidden, out)``.
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    algorithm : Algorithm
        ``braintrace.D_RTRL()``, ``braintrace.ES_D_RTRL(...)`` (alias ``pp_prop``) or
        ``braintrace.BPTT()``.
    batched : bool
        ``True`` when ``x``, every ``hidden`` leaf and ``target`` carry a leading batch
        axis; the per-step loss is then the batch mean of ``loss_fn``.

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
    >>> learner = bt.compile(step, loss, bt.D_RTRL())
    >>> params = {'w': jnp.ones((3, 4)) * 0.1, 'r': jnp.ones((4, 2))}
    >>> state = learner.init(params, jnp.zeros(4), jnp.zeros(3))
    >>> (l, out), grads, state = learner.step(params, state, jnp.ones(3), jnp.zeros(2))
    >>> jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    True
    """
    return Learner(step_fn, loss_fn, algorithm, batched=batched)
