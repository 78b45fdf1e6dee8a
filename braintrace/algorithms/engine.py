"""The learner's engine: a window of steps, its trace credit and the trace update.

A window is ``k`` consecutive steps run as one unit (``docs/algorithms.md``,
"Windows"): one reverse pass through its ``k`` steps gives every parameter its exact
in-window gradient and ``dL_W/dh`` at the window's entry; the algorithm adds the
trace credit ``<dL_W/dh^{t0-1}, eps^{t0-1}>`` and advances the traces over the
``k`` steps. A single step is the window with ``k = 1``. Each step is evaluated
once: :func:`braintrace.compiler.forward.forward` yields the outputs the reverse
pass differentiates and, alongside, the ``x``, ``D`` and ``D_f`` the traces need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ..compiler.graph import ETPGraph
from .base import Algorithm, LearnerState, Signals
from .wiring import stack_group, zero_after

__all__ = ["Problem", "run_window", "split_float", "with_values"]

_tree_map = jax.tree_util.tree_map


class Problem(NamedTuple):
    """What a window needs besides its data: the model, its loss and the algorithm.

    ``loss(out, target)`` is one step's scalar loss (the batch mean when batched);
    ``graph`` is ``None`` for an algorithm without traces.
    """

    step_fn: Callable
    loss: Callable
    algorithm: Algorithm
    graph: ETPGraph | None


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def split_float(tree) -> tuple[list, list, Any]:
    """Flat leaves, the indices of the floating ones, and the treedef."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return leaves, [i for i, a in enumerate(leaves) if _is_float(a)], treedef


def with_values(leaves: list, idx: list, values) -> list:
    """``leaves`` with ``values`` put at the indices ``idx``."""
    out = list(leaves)
    for i, v in zip(idx, values):
        out[i] = v
    return out


def _forward_fn(problem: Problem) -> Callable:
    """``(params, hidden, x) -> (new_hidden, out, parts)``: one evaluation of the step."""
    if problem.graph is None:
        return lambda p, h, x: (*problem.step_fn(p, h, x), None)
    return lambda p, h, x: problem.algorithm.forward(problem.graph, p, h, x)


def hold(active, new, old):
    """``new`` for the samples where ``active``, ``old`` (kept) for the others.

    ``active`` is ``None`` (every sample: ``new``), a ``(B,)`` bool array for a
    batched state or a scalar; it selects (``where``), so nothing of a padded step's
    values reaches a kept state.
    """
    if active is None:
        return new

    def pick(n, o):
        return jnp.where(active.reshape(active.shape + (1,) * (jnp.ndim(n) - active.ndim)), n, o)

    return _tree_map(pick, new, old)


def _total_loss(problem: Problem, params, hidden, xs, targets, single: bool, active=None):
    """The window's summed loss, with ``(h_end, losses, outs, parts)`` as aux.

    Where ``active`` is false (a padded step of a sample), the hidden state is kept.
    """
    fwd = _forward_fn(problem)
    if single:
        new_h, out, parts = fwd(params, hidden, xs)
        loss = problem.loss(out, targets)
        return loss, (hold(active, new_h, hidden), loss, out, parts)

    def body(h, inputs):
        x, target, a = inputs
        new_h, out, parts = fwd(params, h, x)
        return hold(a, new_h, h), (problem.loss(out, target), out, parts)

    h_end, (losses, outs, parts) = lax.scan(body, hidden, (xs, targets, active))
    return losses.sum(), (h_end, losses, outs, parts)


def _reverse_pass(problem: Problem, params, hidden, xs, targets, single: bool, active=None):
    """One reverse pass: ``(aux, param grads by leaf, dL/dh^{t0-1} by leaf)``."""
    p_leaves, p_float, p_def = split_float(params)
    h_leaves, h_float, h_def = split_float(hidden)

    def total(pf, hf):
        p = jax.tree_util.tree_unflatten(p_def, with_values(p_leaves, p_float, pf))
        h = jax.tree_util.tree_unflatten(h_def, with_values(h_leaves, h_float, hf))
        return _total_loss(problem, p, h, xs, targets, single, active)

    pf = [p_leaves[i] for i in p_float]
    hf = [h_leaves[i] for i in h_float]
    loss, vjp_fn, aux = jax.vjp(total, pf, hf, has_aux=True)
    g_pf, g_hf = vjp_fn(jnp.ones_like(loss))
    grads = with_values([jnp.zeros_like(a) for a in p_leaves], p_float, g_pf)
    signal = with_values([None] * len(h_leaves), h_float, g_hf)
    return aux, grads, signal


def _add_credit(problem: Problem, p_leaves, grads: list, signal: list, state) -> tuple:
    """``(grads + credit, credit)``: the trace credit added to the reverse pass's gradients."""
    graph = problem.graph
    groups = {g: stack_group(graph, g, signal) for g in {r.group for r in graph.relations}}
    signals = Signals(tuple(signal), groups)
    credit = problem.algorithm.credit(graph, p_leaves, state.traces, signals, state.count)
    grads = list(grads)
    for leaf, value in credit.items():
        grads[leaf] = grads[leaf] + value.astype(grads[leaf].dtype)
    return grads, credit


def _after(credit: dict, parts):
    """``parts`` made to depend on ``credit``, so the trace update runs after the credit.

    Without a data edge XLA cannot tell that the credit (which reads the old traces)
    runs before the update (which overwrites them), and copies every trace each step
    to keep both safe. The edge (:func:`~.wiring.zero_after`) goes on the step's small
    factors (``x``, ``D``, ``D_f``), not on the weight-sized traces, whose update loop
    would then recompute it for every element.
    """
    zero = zero_after(credit)
    return _tree_map(
        lambda a: a + zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a, parts
    )


def _counted(count, active):
    """The count after one step: ``+1``, or ``+1`` only where ``active``."""
    return count + 1 if active is None else count + active.astype(count.dtype)


def _advance(problem: Problem, p_leaves, state, parts, single: bool, active=None):
    """Traces and counts after the window's steps (kept where ``active`` is false)."""
    algo, graph = problem.algorithm, problem.graph
    if single:
        traces = algo.update(graph, p_leaves, state.traces, parts, state.count)
        return hold(active, traces, state.traces), _counted(state.count, active)

    def body(carry, inputs):
        (traces, count), (step_parts, a) = carry, inputs
        new = algo.update(graph, p_leaves, traces, step_parts, count)
        return (hold(a, new, traces), _counted(count, a)), None

    (traces, count), _ = lax.scan(body, (state.traces, state.count), (parts, active))
    return traces, count


def run_window(
    problem: Problem, params, state: LearnerState, xs, targets, single: bool, active=None
):
    """``((losses, outs), grads, new_state)`` for one window (one step when ``single``).

    ``active`` (optional, bool, per step and sample like ``state.count``): where it is
    false the step is padding, and the sample's hidden state, traces and count stay
    as they were (the loss of such a step is the caller's to mask).
    """
    (h_end, losses, outs, parts), grads, signal = _reverse_pass(
        problem, params, state.hidden, xs, targets, single, active
    )
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    if problem.graph is None:
        steps = 1 if single else jax.tree_util.tree_leaves(xs)[0].shape[0]
        if active is not None:
            steps = (active if single else active.sum(0)).astype(state.count.dtype)
        traces, count = state.traces, state.count + steps
    else:
        grads, credit = _add_credit(problem, p_leaves, grads, signal, state)
        parts = _after(credit, parts)
        traces, count = _advance(problem, p_leaves, state, parts, single, active)
    grads = jax.tree_util.tree_unflatten(treedef, grads)
    return (losses, outs), grads, LearnerState(h_end, traces, count)
