"""The step differentiated whole, one sample at a time: what RTRL and UORO read.

D-RTRL and its kin read the compiler's per-op factors (``x``, ``D``, ``D_f``). RTRL
and UORO need the full step Jacobians instead (``docs/algorithms.md``, "RTRL"):
``J^t = dh^t/dh^{t-1}`` with every path included, and ``I^t = dh^t/dtheta`` for
every float ``params`` leaf that reaches a hidden state (ETP op or plain ``jnp``).
Both are per sample. A batched step (Flax style, a leading batch axis everywhere)
is run on one sample at a time as a batch of one, mapped over the batch with
``jax.vmap``: a reverse pass through the batched step would sum the parameter
cotangents over the samples.

Each step records its inputs (:class:`StepInputs`); the algorithm's update
differentiates the step at them (:mod:`.sample_grads`). The hidden state is seen per
sample as one flat vector ``h`` of its float leaves (size ``H``) and the trained
leaves as a list ``theta``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..compiler.graph import ETPGraph
from ..compiler.program import is_inexact
from ..compiler.report import TRACE, CompileReport
from .engine import with_values

__all__ = [
    "StepInputs",
    "record_inputs",
    "described",
    "influenced",
    "state_leaves",
    "state_size",
    "state_dtype",
    "flat_state",
    "split_state",
    "per_sample",
    "sample_fn",
]

_sg = jax.lax.stop_gradient
_tree_map = jax.tree_util.tree_map


class StepInputs(NamedTuple):
    """What one step was evaluated at: ``h^{t-1}`` and ``x^t`` (constant to the reverse pass)."""

    hidden: Any
    x: Any


def record_inputs(graph: ETPGraph, params, hidden, x) -> tuple:
    """``(new_hidden, out, StepInputs)``: the step as written, and its inputs."""
    new_hidden, out = graph.step(params, hidden, x)
    return new_hidden, out, StepInputs(_tree_map(_sg, hidden), _tree_map(_sg, x))


def described(report: CompileReport, gradient: str, reason: str) -> CompileReport:
    """``report`` with every leaf that reaches the state trained by the influence (mode
    ``trace`` over every group) with ``gradient`` and ``reason``."""
    groups = tuple(g.index for g in report.groups)
    return report.retrained(TRACE, gradient, reason, groups)


def influenced(graph: ETPGraph) -> tuple:
    """Flat indices of the float ``params`` leaves that reach a hidden state."""
    return tuple(
        i
        for i, entry in enumerate(graph.report.params)
        if entry.reaches_hidden and jnp.issubdtype(jnp.dtype(entry.dtype), jnp.inexact)
    )


def state_leaves(graph: ETPGraph) -> tuple:
    """Flat indices of the float ``hidden`` leaves (the ones a derivative flows through)."""
    return tuple(i for i, a in enumerate(graph.hidden_avals) if is_inexact(a))


def _sample_shape(graph: ETPGraph, leaf: int) -> tuple:
    shape = tuple(graph.hidden_avals[leaf].shape)
    return shape[1:] if graph.batched else shape


def state_size(graph: ETPGraph) -> int:
    """``H``: the elements of one sample's float hidden leaves."""
    return sum(math.prod(_sample_shape(graph, i)) for i in state_leaves(graph))


def state_dtype(graph: ETPGraph):
    """The dtype the flat state is kept in (the float hidden leaves' common type)."""
    return jnp.result_type(*(graph.hidden_avals[i].dtype for i in state_leaves(graph)))


def flat_state(graph: ETPGraph, hidden_leaves: list, lead: int) -> jax.Array:
    """The float leaves of ``hidden_leaves`` as ``(*lead_axes, H)`` (``lead``: 0 or 1 axes)."""
    dtype = state_dtype(graph)
    parts = []
    for i in state_leaves(graph):
        a = hidden_leaves[i]
        parts.append(a.reshape(a.shape[:lead] + (-1,)).astype(dtype))
    return jnp.concatenate(parts, axis=-1)


def sample_fn(graph: ETPGraph, param_leaves: list, inputs: StepInputs, sel=None) -> Callable:
    """``f(theta, h) -> h'`` for ONE sample at ``inputs`` (one sample's ``StepInputs``).

    ``theta`` lists the ``params`` leaves ``sel`` (default: the :func:`influenced`
    ones; the others are constants); ``h`` and ``h'`` are flat float states of size ``H``.
    """
    sel = influenced(graph) if sel is None else sel
    h_leaves = jax.tree_util.tree_leaves(inputs.hidden)
    x = inputs.x
    lead = (lambda a: a[None]) if graph.batched else (lambda a: a)
    drop = (lambda a: a[0]) if graph.batched else (lambda a: a)

    def f(theta: list, h: jax.Array) -> jax.Array:
        params = jax.tree_util.tree_unflatten(
            graph.params_def, with_values(param_leaves, sel, theta)
        )
        full = with_values(h_leaves, state_leaves(graph), split_state(graph, h, 0))
        hidden = jax.tree_util.tree_unflatten(graph.hidden_def, [lead(a) for a in full])
        new_hidden, _ = graph.step(params, hidden, _tree_map(lead, x))
        new = [drop(a) for a in jax.tree_util.tree_leaves(new_hidden)]
        return flat_state(graph, new, 0)

    return f


def split_state(graph: ETPGraph, flat: jax.Array, lead: int) -> list:
    """A flat state ``(*lead_axes, H)`` back into the float hidden leaves (with the lead)."""
    leaves, start = [], 0
    for i in state_leaves(graph):
        shape = _sample_shape(graph, i)
        size = math.prod(shape)
        piece = flat[..., start : start + size].reshape(flat.shape[:lead] + shape)
        leaves.append(piece.astype(graph.hidden_avals[i].dtype))
        start += size
    return leaves


def per_sample(graph: ETPGraph, fn: Callable) -> Callable:
    """``fn`` over the samples: ``jax.vmap`` when the graph is batched, else ``fn`` itself."""
    return jax.vmap(fn) if graph.batched else fn
