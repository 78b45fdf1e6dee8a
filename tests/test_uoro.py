"""UORO: unbiased on average over independent keys, exact in one window, keys per sample.

The oracle is BPTT (``jax.grad`` through ``lax.scan``, float64). UORO's summed
gradient is a random estimate of RTRL's (= BPTT's); its mean over independent key
streams must approach BPTT as the number of keys grows, and must not when every
stream is the same (negative control).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
import braintrace_flax.nnx as btnnx
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad, cosine
from oracles import rel_err

F64 = jnp.float64
TRAINED = ("wx", "wh", "b")  # the readout is exact for every algorithm: left out


def _rnn_problem(n=8, t=20, lead=()):
    params = M.rnn_params(seed=0, n=n)
    k = jax.random.split(jax.random.PRNGKey(5), 2)
    xs = jax.random.normal(k[0], (t,) + lead + (M.N_IN,), F64)
    targets = jax.random.normal(k[1], (t,) + lead + (2,), F64)
    return params, jnp.zeros(lead + (n,), F64), xs, targets


def test_uoro_is_unbiased_over_independent_keys():
    params, h0, xs, targets = _rnn_problem()
    learner = bt.compile(M.rnn_step, M.mse, bt.UORO(), batched=False)

    def summed(key):
        return learner.scan(params, learner.init(params, h0, xs[0], key=key), xs, targets)[1]

    estimates = jax.jit(jax.vmap(summed))(jax.random.split(jax.random.key(0), 1024))
    exact = bptt_grad(M.rnn_step, M.mse, params, h0, xs, targets)

    def cos_of_mean(trees):
        mean = jax.tree_util.tree_map(lambda a: a.mean(0), trees)
        return cosine({k: mean[k] for k in TRAINED}, {k: exact[k] for k in TRAINED})

    few = cos_of_mean(jax.tree_util.tree_map(lambda a: a[:64], estimates))
    many = cos_of_mean(estimates)
    # Measured (n=8, T=20): 0.979 with 64 keys, 0.999 with 1024.
    assert many >= 0.9 and many > few, (few, many)
    # Negative control: 1024 copies of one key stream average to that one noisy run.
    same = jax.jit(jax.vmap(summed))(jnp.stack([jax.random.key(0)] * 1024))
    one = cosine({k: same[k][0] for k in TRAINED}, {k: exact[k] for k in TRAINED})
    assert cos_of_mean(same) == pytest.approx(one, abs=1e-9) and one < 0.9 < many


def test_uoro_over_one_window_is_bptt():
    params, h0, xs, targets = _rnn_problem(n=4, t=6, lead=(3,))
    learner = bt.compile(M.rnn_step, M.mse, bt.UORO())
    state = learner.init(params, h0, xs[0], key=jax.random.key(2))
    _, grads, after = jax.jit(learner.window)(params, state, xs, targets)
    reference = bptt_grad(M.rnn_step, M.mse, params, h0, xs, targets, True)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name
    assert bool((after.count == 6).all()) and float(jnp.abs(after.traces.h_tilde).max()) > 0


def test_uoro_keys_are_per_sample_and_reset_keeps_the_stream():
    params, h0, xs, targets = _rnn_problem(n=4, t=3, lead=(3,))
    learner = bt.compile(M.rnn_step, M.mse, bt.UORO())
    state = learner.init(params, h0, xs[0], key=jax.random.key(7))
    keys = np.asarray(state.traces.key)
    assert keys.shape == (3, 2) and len({tuple(k) for k in keys}) == 3  # one stream each
    again = learner.init(params, h0, xs[0], key=jax.random.key(7))
    np.testing.assert_array_equal(again.traces.key, keys)  # the same key, the same streams
    default = learner.init(params, h0, xs[0])  # no key: a fixed default, not an error
    assert not np.array_equal(default.traces.key, keys)
    _, _, moved = jax.jit(learner.scan)(params, state, xs, targets)
    assert not np.array_equal(moved.traces.key, keys)  # the stream advances per step
    reset = learner.reset(moved, jnp.array([True, False, True]))
    np.testing.assert_array_equal(reset.traces.key, moved.traces.key)  # ... and goes on
    assert float(jnp.abs(reset.traces.h_tilde[0]).max()) == 0.0
    assert float(jnp.abs(reset.traces.theta_tilde[0][0]).max()) == 0.0
    np.testing.assert_array_equal(reset.traces.h_tilde[1], moved.traces.h_tilde[1])


@pytest.mark.parametrize("key", [3, "seed", jnp.zeros(4, jnp.uint32)])
def test_uoro_refuses_a_key_that_is_not_a_prng_key(key):
    params, h0, xs, _ = _rnn_problem(n=4, t=2)
    learner = bt.compile(M.rnn_step, M.mse, bt.UORO(), batched=False)
    with pytest.raises(TypeError, match=r"UORO: key must be a PRNG key .*key=jax.random.key\(0\)"):
        learner.init(params, h0, xs[0], key=key)


def test_uoro_takes_its_key_through_every_face():
    """``init(..., key=)`` reaches the algorithm from the linen, NNX and Equinox faces."""
    x, carry = jnp.ones((2, M.N_IN), jnp.float32), jnp.zeros((2, M.N), jnp.float32)
    cell = nn.SimpleCell(M.N)
    params = cell.init(jax.random.PRNGKey(0), carry, x)["params"]
    linen = btf.compile(cell, M.mse, bt.UORO(), convert_dense=True)
    nnx_cell = btnnx.convert(nnx.SimpleCell(M.N_IN, M.N, rngs=nnx.Rngs(0)))
    eqx_model = _EqxNet(bte.ETPLIFCell(M.N_IN, M.N, key=jax.random.PRNGKey(0)))
    eqx_learner = bte.compile(eqx_model, M.mse, bt.UORO())
    x_e = x.astype(eqx_model.cell.linear.weight.dtype)
    carry_e = (carry.astype(x_e.dtype),) * 2
    states = [
        linen.init(params, carry, x, key=jax.random.key(4)),
        btnnx.compile(nnx_cell, M.mse, bt.UORO()).init(nnx_cell, carry, x, key=jax.random.key(4)),
        eqx_learner.init(eqx_model, carry_e, x_e, key=jax.random.key(4)),
    ]
    for state in states:
        assert state.traces.key.shape == (2, 2)
        np.testing.assert_array_equal(states[0].traces.key, state.traces.key)
    target = jnp.zeros((2, 2), x_e.dtype)
    _, grads, _ = eqx.filter_jit(eqx_learner.step)(eqx_model, states[2], x_e, target)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


class _EqxNet(eqx.Module):
    cell: bte.ETPLIFCell

    def __call__(self, x, hidden):
        hidden = self.cell(x, hidden)
        return hidden, hidden[0][:2]


@pytest.mark.slow
def test_a_batch_is_the_mean_of_its_samples_each_on_its_own_stream():
    """The batched learner (per-sample cotangents through the ops' rules, one batched
    forward-mode pass) against the unbatched one, whose estimate the unbiasedness test
    checks: with each sample's own key, the batch gradient is the mean of the samples'."""
    params, h0, xs, targets = _rnn_problem(n=4, t=5, lead=(3,))
    h0 = h0 + 0.3
    batched = bt.compile(M.rnn_step, M.mse, bt.UORO())
    state = batched.init(params, h0, xs[0], key=jax.random.key(3))
    _, grads, after = jax.jit(batched.scan)(params, state, xs, targets)
    single = bt.compile(M.rnn_step, M.mse, bt.UORO(), batched=False)
    keys = jax.random.split(jax.random.key(3), 3)
    per_sample = []
    for b in range(3):
        s = single.init(params, h0[b], xs[0, b], key=keys[b])
        per_sample.append(jax.jit(single.scan)(params, s, xs[:, b], targets[:, b])[1])
    for name in params:
        mean = sum(g[name] for g in per_sample) / 3
        assert rel_err(grads[name], mean) <= 1e-12, name
    assert float(jnp.abs(after.traces.h_tilde).min()) > 0  # every stream ran
