"""Warnings point at the user's line, whichever face or transformation raised them.

Each test calls an entry point from this file and checks the warning's recorded
filename: a fixed ``stacklevel`` pointed into the Flax/Equinox face (or into JAX)
when the same warning came through another entry point.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
import braintrace_flax.nnx as btnnx
from braintrace import ops
from braintrace.primitive import compiling
from braintrace.user_frame import warn_at_user

B, N, N_IN = 2, 3, 2


def _mse(out, target):
    return jnp.sum((out - target) ** 2)


def _only_here(record, category):
    found = [w for w in record if issubclass(w.category, category)]
    assert found, [str(w.message) for w in record]
    assert {w.filename for w in found} == {__file__}, [w.filename for w in found]


def test_core_learner_truncation_points_here():
    def step(p, h, x):  # no ETP op: every weight is truncated
        h = jnp.tanh(x @ p["w"] + h @ p["u"])
        return h, h

    params = {"w": jnp.ones((N_IN, N)), "u": jnp.eye(N)}
    learner = bt.compile(step, _mse, bt.D_RTRL(), batched=True)
    with pytest.warns(bt.TruncationWarning) as record:
        learner.init(params, jnp.zeros((B, N)), jnp.zeros((B, N_IN)))
    _only_here(record, bt.TruncationWarning)


def test_linen_face_truncation_points_here():
    cell = nn.GRUCell(N)  # plain nn.Dense: no ETP op without convert_dense
    h, x = jnp.zeros((B, N)), jnp.ones((B, N_IN))
    params = cell.init(jax.random.key(0), h, x)["params"]
    learner = btf.compile(cell, _mse, bt.D_RTRL())
    with pytest.warns(bt.TruncationWarning) as record:
        learner.init(params, h, x)
    _only_here(record, bt.TruncationWarning)


def test_nnx_face_truncation_points_here():
    cell = nnx.GRUCell(N_IN, N, rngs=nnx.Rngs(0))  # not converted: no ETP op
    h, x = jnp.zeros((B, N)), jnp.ones((B, N_IN))
    learner = btnnx.compile(cell, _mse, bt.D_RTRL())
    with pytest.warns(bt.TruncationWarning) as record:
        learner.init(cell, h, x)
    _only_here(record, bt.TruncationWarning)


class _PlainRNN(eqx.Module):
    cell: eqx.nn.GRUCell

    def __call__(self, x, hidden):
        hidden = self.cell(x, hidden)
        return hidden, hidden


def test_equinox_face_truncation_points_here():
    model = _PlainRNN(eqx.nn.GRUCell(N_IN, N, key=jax.random.PRNGKey(0)))
    learner = bte.compile(model, _mse, bt.D_RTRL())
    with pytest.warns(bt.TruncationWarning) as record:
        learner.init(model, jnp.zeros((B, N)), jnp.zeros((B, N_IN)))
    _only_here(record, bt.TruncationWarning)


def test_identity_warning_under_vmap_points_here():
    w = jnp.ones((B, N_IN, N))  # batched weights: the op cannot stay an ETP primitive
    with compiling(), pytest.warns(bt.ETPIdentityWarning) as record:
        jax.vmap(ops.dense)(jnp.ones((B, N_IN)), w)
    _only_here(record, bt.ETPIdentityWarning)


def test_a_direct_call_points_at_its_caller():
    with pytest.warns(UserWarning, match="from here") as record:
        warn_at_user("from here", UserWarning)
    assert record[0].filename == __file__
