"""The embedding ETP op (``braintrace.ops.embed``) against BPTT and against a one-hot dense op.

Exact class: the embedding drives a LIF membrane (current then voltage, same-step
coupling) directly, with no recurrent op; each sequence repeats an id. D-RTRL's
summed gradient must equal BPTT's (``jax.grad`` through ``lax.scan``, float64) to
1e-10, batched (a Flax-style step) and unbatched (one sample, Equinox style), with a
scalar id per sample and with a sequence of ids per sample (the trace keeps the
positions). pp_prop at ``T = 1`` equals D-RTRL; at ``T > 1`` with decays it equals
pp_prop on the same model written with a dense op on one-hot inputs (whose pp_prop
is checked against an explicit loop in ``test_pp_prop_oracle.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace as bt
from braintrace import ops
from braintrace.surrogate import spike
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

V, F, T, B = 6, 3, 5, 2
EXACT = 1e-10

#: Time-major ids; every sequence repeats an id (sample 0: 1, sample 1: 3).
IDS = jnp.array([[1, 3], [3, 3], [1, 0], [4, 2], [1, 3]])


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _lif(h, y):
    i = 0.8 * h["i"] + y
    v = 0.7 * h["v"] * (1.0 - spike(h["v"] - 1.0)) + 0.3 * i
    return {"i": i, "v": v}


def embed_step(p, h, ids):
    new = _lif(h, ops.embed(ids, p["table"]))
    return new, jnp.tanh(new["v"]) @ p["ro"]


def seq_step(p, h, ids):
    """One sample's (or a batch's) sequence of ids, ``(..., L)``: positions ``(L, F)``."""
    new = _lif(h, ops.embed(ids, p["table"], batched=ids.ndim == 2))
    return new, jnp.tanh(new["v"]).sum(-2) @ p["ro"]


def onehot_step(p, h, ids):
    """The same model through a dense op on one-hot float inputs (pp_prop's reference)."""
    new = _lif(h, ops.dense(jax.nn.one_hot(ids, V, dtype=p["table"].dtype), p["table"]))
    return new, jnp.tanh(new["v"]) @ p["ro"]


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"table": 1.5 * jax.random.normal(k1, (V, F)), "ro": jax.random.normal(k2, (F, 2))}


def _hidden(shape):
    return {"i": jnp.zeros(shape), "v": jnp.full(shape, 0.5)}


def _targets(lead):
    return jax.random.normal(jax.random.PRNGKey(3), (T,) + lead + (2,))


def _run(step, algo, ids, hidden, batched, t=T):
    learner = bt.compile(step, mse, algo, batched=batched)
    params, targets = _params(), _targets(ids.shape[1:2] if batched else ())
    report = learner.report(params, hidden, ids[0])
    state = learner.init(params, hidden, ids[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, ids[:t], targets[:t])
    return grads, report, params, targets


CASES = {
    "batched": (embed_step, IDS, lambda: _hidden((B, F)), True),
    "unbatched": (embed_step, IDS[:, 0], lambda: _hidden((F,)), False),
}


@pytest.mark.slow  # the default run checks the op through the linen face instead
@pytest.mark.parametrize("case", ["batched"])
def test_d_rtrl_equals_bptt(case):
    step, ids, hidden, batched = CASES[case]
    grads, report, params, targets = _run(step, bt.D_RTRL(), ids, hidden(), batched)
    assert "exact" in str(report) and "etp_embed" in str(report)
    ref = bptt_grad(step, mse, params, hidden(), ids, targets, batched)
    assert rel_err(grads["table"], ref["table"]) < EXACT
    assert rel_err(grads["ro"], ref["ro"]) < EXACT
    # rows never seen get exactly zero gradient
    unseen = np.setdiff1d(np.arange(V), np.asarray(ids).ravel())
    assert unseen.size and float(jnp.abs(grads["table"][unseen]).max()) == 0.0


@pytest.mark.slow
def test_unbatched_and_one_step_control():
    """Unbatched (one sample per step); negative control: one-step gradients are far off."""
    step, ids, hidden, batched = CASES["unbatched"]
    grads, _, params, targets = _run(step, bt.D_RTRL(), ids, hidden(), batched)
    ref = bptt_grad(step, mse, params, hidden(), ids, targets, batched)
    assert rel_err(grads["table"], ref["table"]) < EXACT
    one, *_ = _run(step, bt.OneStep(), ids, hidden(), batched)
    assert rel_err(one["table"], ref["table"]) > 1e-2


@pytest.mark.slow
def test_d_rtrl_positions_equals_bptt():
    """A sequence of ids per sample: the trace keeps the positions and stays exact."""
    ids = jnp.stack([IDS, IDS[:, ::-1], (IDS + 2) % V], axis=-1)  # (T, B, L=3)
    for batched in (True, False):
        xs = ids if batched else ids[:, 0]
        hidden = _hidden(xs.shape[1:] + (F,))
        grads, _, params, targets = _run(seq_step, bt.D_RTRL(), xs, hidden, batched)
        ref = bptt_grad(seq_step, mse, params, hidden, xs, targets, batched)
        assert rel_err(grads["table"], ref["table"]) < EXACT


@pytest.mark.slow
def test_pp_prop_one_step_and_one_hot_reference():
    """pp_prop at T = 1 is D-RTRL; at T > 1 it is pp_prop on one-hot inputs to a dense op."""
    hidden = _hidden((B, F))
    algo = bt.pp_prop((0.6, 0.3), warmup_correction=True)
    pp1, *_ = _run(embed_step, algo, IDS, hidden, True, t=1)
    dr1, *_ = _run(embed_step, bt.D_RTRL(), IDS, hidden, True, t=1)
    assert rel_err(pp1["table"], dr1["table"]) < EXACT
    got, *_ = _run(embed_step, algo, IDS, hidden, True)
    ref, *_ = _run(onehot_step, algo, IDS, hidden, True)
    assert rel_err(got["table"], ref["table"]) < EXACT
    exact, *_ = _run(embed_step, bt.D_RTRL(), IDS, hidden, True)
    assert rel_err(got["table"], exact["table"]) > 1e-3  # pp_prop is an approximation here


def test_forward_matches_take_and_errors():
    table = _params()["table"]
    ids = jnp.array([[0, 4, -1], [2, 2, 1]])
    assert (ops.embed(ids, table) == jnp.take(table, ids, axis=0)).all()
    assert ops.embed(jnp.array(3), table).shape == (F,)
    with pytest.raises(TypeError, match="ops.embed: ids must be integers"):
        ops.embed(jnp.array([1.0]), table)
    with pytest.raises(IndexError, match=r"ops.embed: ids must lie in \[-6, 6\)"):
        ops.embed(jnp.array([6]), table)
    with pytest.raises(ValueError, match="ops.embed: table must be 2-D"):
        ops.embed(jnp.array([1]), table[0])
