"""UORO: an unbiased rank-one estimate of the influence matrix, ``O(H + P)`` per sample.

Per sample (``docs/algorithms.md``, "UORO"), ``M ~ h_tilde theta_tilde^T`` with, each
step, fresh random signs ``nu`` (one per hidden element):

    h_tilde     <- rho0 * J h_tilde + rho1 * nu
    theta_tilde <- theta_tilde / rho0 + (nu^T I) / rho1
    rho0 = sqrt(|theta_tilde| / |J h_tilde|),   rho1 = sqrt(|nu^T I| / |nu|)

``J h_tilde`` is one forward-mode pass through the step and ``nu^T I`` one reverse
pass, per sample. ``E_nu[h_tilde theta_tilde^T]`` follows the RTRL recursion, so the
estimate is unbiased; the ``rho`` keep the two factors' norms balanced (the
variance-minimising choice). Each sample carries its own key stream.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..compiler.report import APPROXIMATE, CompileReport
from . import sample_grads
from . import whole_step as ws
from .base import Algorithm
from .engine import with_values

__all__ = ["UORO", "UOROTraces", "key_data"]

#: Keeps the ``rho`` finite where a factor is zero (the first step, a dead unit).
_EPS = 1e-7


class UOROTraces(NamedTuple):
    """UORO's state, every leaf per sample when the learner is batched.

    Attributes
    ----------
    h_tilde : Array
        ``(*lead, H)``: the hidden-side factor over the flat float hidden state.
    theta_tilde : tuple
        Per influenced ``params`` leaf, ``(*lead, *leaf.shape)``: the parameter side.
    key : Array
        ``(*lead, 2)`` ``uint32``: each sample's PRNG key data (``jax.random.key_data``).
    """

    h_tilde: jax.Array
    theta_tilde: tuple
    key: jax.Array


def key_data(key, who: str = "UORO") -> jax.Array:
    """The raw ``uint32`` data of a default-implementation PRNG key, or a clear error."""
    if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
    else:
        data = jnp.asarray(key) if hasattr(key, "shape") else None
    want = jax.random.key_data(jax.random.key(0)).shape
    if data is None or data.dtype != jnp.uint32 or data.shape != want:
        raise TypeError(
            f"{who}: key must be a PRNG key of JAX's default implementation, e.g. "
            f"learner.init(params, hidden, x, key=jax.random.key(0)); got {key!r}. "
            "Pass one key per learner (vmap learner.init over keys for independent estimates)."
        )
    return data


def _norms(tree, lead: int) -> jax.Array:
    """Per-sample Euclidean norm over every leaf of ``tree`` (shape ``(*lead_axes,)``)."""
    squares = [
        jnp.sum(jnp.square(a).reshape(a.shape[:lead] + (-1,)), -1)
        for a in jax.tree_util.tree_leaves(tree)
    ]
    return jnp.sqrt(sum(squares))


def _signs(keys: jax.Array, size: int, dtype, lead: int) -> tuple:
    """``(new keys, nu)``: each sample's next key and its ``size`` random signs."""

    def one(data):
        key, sub = jax.random.split(jax.random.wrap_key_data(data))
        return jax.random.key_data(key), jax.random.rademacher(sub, (size,), dtype)

    return jax.vmap(one)(keys) if lead else one(keys)


def _state_jvp(graph, param_leaves, inputs, h_tilde, lead: int) -> jax.Array:
    """``J h_tilde`` per sample: one forward-mode pass through the (batched) step."""
    params = jax.tree_util.tree_unflatten(graph.params_def, param_leaves)
    hidden_leaves = jax.tree_util.tree_leaves(inputs.hidden)

    def new_state(flat):
        leaves = with_values(
            hidden_leaves, ws.state_leaves(graph), ws.split_state(graph, flat, lead)
        )
        hidden = jax.tree_util.tree_unflatten(graph.hidden_def, leaves)
        new_hidden, _ = graph.step(params, hidden, inputs.x)
        return ws.flat_state(graph, jax.tree_util.tree_leaves(new_hidden), lead)

    h = ws.flat_state(graph, hidden_leaves, lead)
    return jax.jvp(new_state, (h,), (h_tilde.astype(h.dtype),))[1]


def _scale(values, factor, lead: int):
    """Each sample's ``values`` times its ``factor``."""
    return tuple(
        v * factor.reshape(factor.shape + (1,) * (v.ndim - lead)).astype(v.dtype) for v in values
    )


class UORO(Algorithm):
    """Unbiased online recurrent optimisation: a rank-one, unbiased influence estimate.

    Memory ``O(H + P)`` per sample (a hidden-sized and a parameter-sized factor) for
    every float parameter leaf that reaches the hidden state, as RTRL, but the
    gradient is a random estimate whose mean over the random signs is RTRL's:
    noisy per run, exact on average. Each sample draws from its own key stream,
    seeded by ``learner.init(..., key=jax.random.key(i))`` (a fixed default key
    without one: two learners then draw the same signs); ``learner.reset`` zeroes
    the factors and keeps the stream going.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace as bt
    >>> from braintrace.testing import models
    >>> learner = bt.compile(models.rnn_step, models.mse, bt.UORO(), batched=True)
    >>> params = models.rnn_params()
    >>> state = learner.init(params, jnp.zeros((5, models.N)), jnp.zeros((5, models.N_IN)),
    ...                      key=jax.random.key(1))
    >>> state.traces.h_tilde.shape, state.traces.key.shape
    ((5, 4), (5, 2))
    """

    name = "uoro"
    traced = True

    def describe(self, report: CompileReport, graph) -> CompileReport:
        reason = "UORO: unbiased rank-one estimate of dh/dtheta (noisy)"
        return ws.described(report, APPROXIMATE, reason)

    def init_traces(self, graph, param_leaves, key=None) -> UOROTraces:
        data = key_data(jax.random.key(0) if key is None else key)
        lead = graph.batch_lead
        if lead:
            data = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(data), lead[0]))
        theta = tuple(
            jnp.zeros(lead + jnp.shape(param_leaves[i]), jnp.result_type(param_leaves[i]))
            for i in ws.influenced(graph)
        )
        h_tilde = jnp.zeros(lead + (ws.state_size(graph),), ws.state_dtype(graph))
        return UOROTraces(h_tilde, theta, data)

    def reset_traces(self, traces: UOROTraces) -> UOROTraces:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, (traces.h_tilde, traces.theta_tilde))
        return UOROTraces(*zeros, traces.key)

    def forward(self, graph, params, hidden, x):
        return ws.record_inputs(graph, params, hidden, x)

    def credit(self, graph, param_leaves, traces, signals, count) -> dict:
        lead = 1 if graph.batched else 0
        g = ws.flat_state(graph, list(signals.leaves), lead)
        weight = (g * traces.h_tilde).sum(-1)  # <dL/dh, h_tilde> per sample
        spec = "b,b...->..." if lead else ",...->..."
        return {
            leaf: jnp.einsum(spec, weight.astype(t.dtype), t)
            for leaf, t in zip(ws.influenced(graph), traces.theta_tilde)
        }

    def update(self, graph, param_leaves, traces, parts, count) -> UOROTraces:
        lead = 1 if graph.batched else 0
        keys, nu = _signs(traces.key, ws.state_size(graph), traces.h_tilde.dtype, lead)
        j_h = _state_jvp(graph, param_leaves, parts, traces.h_tilde, lead)
        rows = sample_grads.reverse_rows(graph, param_leaves, parts, nu[None], state=False)
        nu_i = [a[:, 0] if lead else a[0] for a in rows.params]
        rho0 = jnp.sqrt((_norms(traces.theta_tilde, lead) + _EPS) / (_norms(j_h, lead) + _EPS))
        rho1 = jnp.sqrt((_norms(nu_i, lead) + _EPS) / (_norms(nu, lead) + _EPS))
        h_tilde = _scale((j_h,), rho0, lead)[0] + _scale((nu,), rho1, lead)[0]
        theta = tuple(
            a + b
            for a, b in zip(
                _scale(traces.theta_tilde, 1.0 / rho0, lead), _scale(nu_i, 1.0 / rho1, lead)
            )
        )
        return UOROTraces(h_tilde.astype(traces.h_tilde.dtype), theta, keys)
