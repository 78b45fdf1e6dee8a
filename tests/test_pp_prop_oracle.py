"""pp_prop against its own oracle: an explicit per-sample NumPy loop over the formulas.

The oracle below implements ``docs/algorithms.md`` ("The learning signal", "pp_prop")
by hand for one model whose ``D`` and ``D_f`` are known in closed form, and shares no
code with ``braintrace/algorithms``: every derivative is written out, the bias keeps
its own input trace (a constant input 1, updated like ``epsx``), and the loop runs
sample by sample in float64. It is compared with ``bt.compile(step, mse,
bt.pp_prop(decay))`` at ``T = 5`` with non-zero decays, with and without the warm-up
correction.

The model: a 2-state feed-forward neuron (no recurrent weight) with a bias and a
plain ``jnp`` readout,

    y^t = x^t W + b
    i^t = 0.8 i^{t-1} + y^t
    v^t = 0.9 tanh(v^{t-1}) + 0.5 tanh(i^t)          (reads this step's i)
    out = tanh(v^t) @ ro,   l_t = mean_b sum_o (out - target)^2

so, per position ``k`` (states ordered ``(i, v)``),

    D^t   = [[0.8,                   0                       ],
             [0.4 sech^2(i^t),       0.9 sech^2(v^{t-1})     ]]
    D_f^t = [1, 0.5 sech^2(i^t)]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace as bt
from braintrace import ops
from oracles import rel_err

T, B, N_IN, N, N_OUT = 5, 3, 3, 4, 2


def step(p, h, x):
    y = ops.dense(x, p["w"], p["b"])
    i = 0.8 * h["i"] + y
    v = 0.9 * jnp.tanh(h["v"]) + 0.5 * jnp.tanh(i)
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _problem(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    params = {
        "w": jax.random.normal(k[0], (N_IN, N), jnp.float64),
        "b": jax.random.normal(k[1], (N,), jnp.float64) * 0.3,
        "ro": jax.random.normal(k[2], (N, N_OUT), jnp.float64) * 0.5,
    }
    hidden = {
        "i": jax.random.normal(k[3], (B, N), jnp.float64) * 0.5,
        "v": jax.random.normal(k[4], (B, N), jnp.float64) * 0.5,
    }
    kx, ky = jax.random.split(k[5])
    xs = jax.random.normal(kx, (T, B, N_IN), jnp.float64)
    targets = jax.random.normal(ky, (T, B, N_OUT), jnp.float64)
    return params, hidden, xs, targets


def _sech2(z):
    return 1.0 / np.cosh(z) ** 2


def _closed_form_step(i_prev, v_prev, y):
    """One sample's new state, ``D`` (N, 2, 2) and ``D_f`` (N, 2), by hand."""
    i = 0.8 * i_prev + y
    v = 0.9 * np.tanh(v_prev) + 0.5 * np.tanh(i)
    d = np.zeros((N, 2, 2))
    d[:, 0, 0] = 0.8
    d[:, 1, 0] = 0.5 * _sech2(i) * 0.8
    d[:, 1, 1] = 0.9 * _sech2(v_prev)
    df = np.stack([np.ones(N), 0.5 * _sech2(i)], axis=-1)
    return i, v, d, df


def oracle_pp_prop(
    params, hidden, xs, targets, alpha_x, alpha_f, warmup, *, credit=True, bias_trace=True
):
    """``sum_t G_t`` of pp_prop, one sample at a time, straight from the formulas.

    ``credit=False`` drops the trace credit (the one-step gradient only) and
    ``bias_trace=False`` gives the bias the input factor 1: the negative controls.
    """
    w, b, ro = (np.asarray(params[k]) for k in ("w", "b", "ro"))
    i_h, v_h = np.array(hidden["i"]), np.array(hidden["v"])
    xs, targets = np.asarray(xs), np.asarray(targets)
    grads = {"w": np.zeros_like(w), "b": np.zeros_like(b), "ro": np.zeros_like(ro)}
    epsx = np.zeros((B, N_IN))  # input-side trace of the weight
    epsx_bias = np.zeros(B)  # the bias' input trace: a constant input 1
    epsf = np.zeros((B, N, 2))  # output-side trace, states (i, v)
    for t in range(T):
        n = t  # trace updates before this step
        c = 1.0 / (1.0 - alpha_f ** max(n, 1)) if warmup and alpha_f > 0 else 1.0
        for s in range(B):
            x = xs[t, s]
            i, v, d, df = _closed_form_step(i_h[s], v_h[s], x @ w + b)
            out = np.tanh(v) @ ro
            dl_dout = 2.0 * (out - targets[t, s]) / B  # the batch mean's 1/B
            dl_dh = np.stack([np.zeros(N), (ro @ dl_dout) * _sech2(v)], axis=-1)
            # The exact one-step reverse pass (h^{t-1} held fixed).
            dl_dy = (dl_dh * df).sum(-1)
            grads["w"] += np.outer(x, dl_dy)
            grads["b"] += dl_dy
            grads["ro"] += np.outer(np.tanh(v), dl_dout)
            # Trace credit <dl_t/dh^{t-1}, eps^{t-1}> with the traces before this step.
            g = np.einsum("ka,kac->kc", dl_dh, d)
            ghat = c * (g * epsf[s]).sum(-1) if credit else np.zeros(N)
            grads["w"] += np.outer(epsx[s], ghat)
            grads["b"] += epsx_bias[s] * ghat
            # The trace updates.
            epsx[s] = alpha_x * epsx[s] + x
            epsx_bias[s] = alpha_x * epsx_bias[s] + 1.0 if bias_trace else 1.0
            epsf[s] = alpha_f * np.einsum("kac,kc->ka", d, epsf[s]) + (1.0 - alpha_f) * df
            i_h[s], v_h[s] = i, v
    return grads


def library_grads(algorithm, params, hidden, xs, targets):
    learner = bt.compile(step, mse, algorithm, batched=True)
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    return grads


@pytest.mark.parametrize("warmup", [False, True], ids=["plain", "warmup"])
@pytest.mark.parametrize("decay", [0.7, (0.5, 0.8)], ids=["0.7", "pair"])
def test_pp_prop_equals_the_per_sample_oracle(decay, warmup):
    params, hidden, xs, targets = _problem()
    alpha_x, alpha_f = decay if isinstance(decay, tuple) else (decay, decay)
    expected = oracle_pp_prop(params, hidden, xs, targets, alpha_x, alpha_f, warmup)
    got = library_grads(bt.pp_prop(decay, warmup_correction=warmup), params, hidden, xs, targets)
    for name in ("w", "b", "ro"):
        assert rel_err(np.asarray(got[name]), expected[name]) <= 1e-10, name


def _check_closed_form_against_jacfwd():
    """The oracle's hand-written D and D_f are the step's Jacobians (y held as an input)."""
    rng = np.random.default_rng(0)
    i_prev, v_prev, y = rng.normal(size=(3, N))

    def cell(h_prev, y):
        i = 0.8 * h_prev[:, 0] + y
        return jnp.stack([i, 0.9 * jnp.tanh(h_prev[:, 1]) + 0.5 * jnp.tanh(i)], -1)

    h_prev = jnp.stack([i_prev, v_prev], -1)
    jac_h = jax.jacfwd(cell, 0)(h_prev, y)  # (N, 2, N, 2)
    jac_y = jax.jacfwd(cell, 1)(h_prev, y)  # (N, 2, N)
    _, _, d, df = _closed_form_step(i_prev, v_prev, y)
    k = np.arange(N)
    np.testing.assert_allclose(np.asarray(jac_h)[k, :, k, :], d, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(np.asarray(jac_y)[k, :, k], df, rtol=1e-14, atol=1e-14)


def test_oracle_is_sound_and_the_comparison_can_fail():
    """The oracle's D, D_f are right; the credit, the decays' sides and the bias trace matter."""
    _check_closed_form_against_jacfwd()
    params, hidden, xs, targets = _problem()
    got = library_grads(bt.pp_prop((0.5, 0.8)), params, hidden, xs, targets)
    got = {k: np.asarray(v) for k, v in got.items()}
    oracle = lambda ax, af, **kw: oracle_pp_prop(params, hidden, xs, targets, ax, af, False, **kw)
    assert rel_err(got["w"], oracle(0.5, 0.8)["w"]) <= 1e-10  # the positive case
    one_step = oracle(0.5, 0.8, credit=False)
    swapped = oracle(0.8, 0.5)
    for name in ("w", "b"):
        assert rel_err(got[name], one_step[name]) > 1e-2, name  # no traces: far off
        assert rel_err(got[name], swapped[name]) > 1e-3, name  # decays on the wrong sides
    assert rel_err(got["b"], oracle(0.5, 0.8, bias_trace=False)["b"]) > 1e-3
    warm = oracle_pp_prop(params, hidden, xs, targets, 0.5, 0.8, True)
    assert rel_err(got["w"], warm["w"]) > 1e-3  # the warm-up correction is not a no-op
