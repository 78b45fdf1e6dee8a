"""The learner's engine: windows, episode resets, state checks, ensembles, one evaluation.

Oracles are BPTT by ``jax.grad`` through ``lax.scan`` in float64 (``oracles.py`` and
``braintrace.testing.reference``), never the learner itself.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import collect_primitives
from jax import lax

import braintrace as bt
from braintrace import ops
from braintrace.testing import models as M
from braintrace.testing.reference import alignment, bptt_grad
from oracles import rel_err

B, T = 3, 7
ALGORITHMS = [bt.D_RTRL(), bt.pp_prop(0.8), bt.OneStep(), bt.BPTT()]


def _input_layer_rnn(p, h, x):
    """A tanh RNN behind a plain-jnp input layer the compiler cannot trace."""
    u = jnp.tanh(x @ p["win"])
    h = jnp.tanh(ops.dense(u, p["wx"], p["b"]) + ops.dense(h, p["wh"]))
    return h, h @ p["ro"]


def _input_layer_params():
    params = M.rnn_params(seed=2, n_in=M.N)
    params["win"] = jax.random.normal(jax.random.PRNGKey(5), (M.N_IN, M.N)) * 0.5
    return params


MODELS = {
    "rnn": (M.rnn_step, lambda: M.rnn_params(seed=1), None),
    "gru": (M.gru_step, lambda: M.gru_params(seed=1), None),
    "rlif": (M.rlif_step, lambda: M.rlif_params(seed=1), ("i", "v")),
    "input_layer": (_input_layer_rnn, _input_layer_params, None),
}


def _setup(model, t=T, seed=3):
    step, make_params, names = MODELS[model]
    params = make_params()
    hidden = (
        M.hidden_like(names, (B,), seed=seed)
        if names
        else 0.5 * jax.random.normal(jax.random.PRNGKey(seed), (B, M.N))
    )
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    xs = jax.random.normal(k1, (t, B, M.N_IN))
    targets = jax.random.normal(k2, (t, B, 2))
    return step, params, hidden, xs, targets


def _learner(step, algo, params, hidden, x0):
    learner = bt.compile(step, M.mse, algo, batched=True)
    with warnings.catch_warnings():
        # The input-layer model is truncated on purpose (its warning: test_exactness.py).
        warnings.simplefilter("ignore", bt.TruncationWarning)
        return learner, learner.init(params, hidden, x0)


# -- windows ------------------------------------------------------------------------------


def _window_cases():
    """Every algorithm on the RNN and behind an untraceable input layer; the GRU and the
    recurrent LIF with D-RTRL (their other algorithms with the slow tests)."""
    for model in sorted(MODELS):
        for algo in ALGORITHMS:
            fast = model in ("rnn", "input_layer") or algo.name == "d_rtrl"
            marks = () if fast else (pytest.mark.slow,)
            yield pytest.param(model, algo, marks=marks, id=f"{algo.name}-{model}")


@pytest.mark.parametrize("model, algo", list(_window_cases()))
def test_one_window_over_the_sequence_is_bptt(model, algo):
    step, params, hidden, xs, targets = _setup(model)
    learner, state = _learner(step, algo, params, hidden, xs[0])
    (losses, _), grads, final = jax.jit(learner.window)(params, state, xs, targets)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name
    assert losses.shape == (T,)
    # The window's end state is the step-by-step end state.
    _, _, stepped = jax.jit(lambda *a: learner.scan(*a, window=1))(params, state, xs, targets)
    for a, b in zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(stepped)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "algo",
    [bt.D_RTRL(), pytest.param(bt.pp_prop(0.8, warmup_correction=True), marks=pytest.mark.slow)],
    ids=lambda a: a.name,
)
def test_window_of_one_is_the_per_step_learner(algo):
    step, params, hidden, xs, targets = _setup("rlif")
    learner, state = _learner(step, algo, params, hidden, xs[0])
    (l1, _), g1, s1 = jax.jit(learner.scan)(params, state, xs, targets)
    (lk, _), gk, sk = jax.jit(lambda *a: learner.scan(*a, window=1))(params, state, xs, targets)

    def by_windows(st):
        acc = jax.tree_util.tree_map(jnp.zeros_like, params)
        for t in range(T):
            _, g, st = learner.window(params, st, xs[t : t + 1], targets[t : t + 1])
            acc = jax.tree_util.tree_map(jnp.add, acc, g)
        return acc

    gw = jax.jit(by_windows)(state)
    for name in params:
        assert rel_err(gk[name], g1[name]) <= 1e-12
        assert rel_err(gw[name], g1[name]) <= 1e-12
    np.testing.assert_allclose(lk, l1, rtol=1e-13)


def test_scan_windows_are_consecutive_windows_with_a_short_last_one():
    step, params, hidden, xs, targets = _setup("rnn")
    learner, state = _learner(step, bt.D_RTRL(), params, hidden, xs[0])
    (losses, outs), grads, final = jax.jit(lambda *a: learner.scan(*a, window=3))(
        params, state, xs, targets
    )
    acc, st, window = jax.tree_util.tree_map(jnp.zeros_like, params), state, jax.jit(learner.window)
    for start in (0, 3, 6):  # T = 7: windows of 3, 3 and 1
        _, g, st = window(params, st, xs[start : start + 3], targets[start : start + 3])
        acc = jax.tree_util.tree_map(jnp.add, acc, g)
    for name in params:
        assert rel_err(grads[name], acc[name]) <= 1e-12
    assert losses.shape == (T,) and outs.shape == (T, B, 2)
    assert bool((final.count == T).all())


def test_windows_are_truncated_bptt_for_one_step():
    """``OneStep`` windows are TBPTT-k: BPTT within each window, nothing across."""
    step, params, hidden, xs, targets = _setup("rnn", t=6)
    learner, state = _learner(step, bt.OneStep(), params, hidden, xs[0])
    _, grads, _ = jax.jit(lambda *a: learner.scan(*a, window=3))(params, state, xs, targets)
    first = bptt_grad(step, M.mse, params, hidden, xs[:3], targets[:3], True)
    h3 = lax.scan(lambda h, x: (step(params, h, x)[0], None), hidden, xs[:3])[0]
    second = bptt_grad(step, M.mse, params, h3, xs[3:], targets[3:], True)
    for name in params:
        assert rel_err(grads[name], first[name] + second[name]) <= 1e-12
    full = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    assert rel_err(grads["wh"], full["wh"]) > 1e-3  # negative control: truncation shows


# Floors on the recurrent-side cosine to BPTT (readout left out), T=30. The cosine must
# rise with the window; the measured values are printed by benchmarks/alignment.py.
WINDOW_FLOORS = {"rnn": (0.85, 0.95, 0.99), "gru": (0.88, 0.95, 0.99), "rlif": (0.35, 0.55, 0.93)}


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("rnn", marks=pytest.mark.slow),
        pytest.param("gru", marks=pytest.mark.slow),
        pytest.param("rlif", marks=pytest.mark.slow),
    ],
)
def test_alignment_rises_with_the_window(model):
    step, params, hidden, xs, targets = _setup(model, t=30, seed=11)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    learner, state = _learner(step, bt.D_RTRL(), params, hidden, xs[0])
    cosines = []
    for k in (1, 4, 16):
        run = jax.jit(lambda *a, k=k: learner.scan(*a, window=k))
        _, grads, _ = run(params, state, xs, targets)
        cosines.append(alignment(grads, reference, skip=("ro",))["cosine"])
    assert cosines[0] < cosines[1] < cosines[2] or cosines[0] > 0.999, cosines
    for got, floor in zip(cosines, WINDOW_FLOORS[model]):
        assert got >= floor, (model, cosines)


def _temp_bytes(learner, params, state, t, window):
    xs, targets = jnp.zeros((t, B, M.N_IN)), jnp.zeros((t, B, 2))
    run = jax.jit(lambda *a: learner.scan(*a, window=window))
    return run.lower(params, state, xs, targets).compile().memory_analysis().temp_size_in_bytes


def test_window_memory_does_not_grow_with_t():
    step, params, hidden, xs, _ = _setup("rnn")
    learner, state = _learner(step, bt.D_RTRL(), params, hidden, xs[0])
    # 2001 is not a multiple of the window: the short last window must not copy the rest.
    short, long = (_temp_bytes(learner, params, state, t, 16) for t in (200, 2001))
    assert long <= 1.1 * short, (short, long)


# -- episode resets ---------------------------------------------------------------------------


def _bptt_with_reset(step, params, hidden, xs, targets, at, mask, new_hidden):
    """BPTT where, before step ``at``, the masked samples restart from ``new_hidden``."""

    def total(p):
        def body(h, inputs):
            t, x, target = inputs
            pick = lambda new, old: jnp.where(  # noqa: E731
                (t == at) & mask.reshape(mask.shape + (1,) * (old.ndim - 1)), new, old
            )
            h = jax.tree_util.tree_map(pick, new_hidden, h)
            h, out = step(p, h, x)
            return h, jax.vmap(M.mse)(out, target).mean()

        return lax.scan(body, hidden, (jnp.arange(len(xs)), xs, targets))[1].sum()

    return jax.grad(total)(params)


@pytest.mark.parametrize(
    "algo", [bt.D_RTRL(), bt.pp_prop(0.6, warmup_correction=True)], ids=lambda a: a.name
)
def test_reset_starts_new_episodes_per_sample(algo):
    params = M.lif_params()
    hidden = M.hidden_like(("i", "v"), (B,))
    k1, k2 = jax.random.split(jax.random.PRNGKey(9))
    xs, targets = jax.random.normal(k1, (T, B, M.N_IN)), jax.random.normal(k2, (T, B, 2))
    mask = jnp.array([True, False, True])
    new_hidden = M.hidden_like(("i", "v"), (B,), seed=4)
    learner, state = _learner(M.lif_step, algo, params, hidden, xs[0])
    _, g1, mid = learner.scan(params, state, xs[:3], targets[:3])
    mid = jax.jit(learner.reset)(mid, mask, new_hidden)
    _, g2, _ = learner.scan(params, mid, xs[3:], targets[3:])
    got = jax.tree_util.tree_map(jnp.add, g1, g2)
    if algo.name == "d_rtrl":  # exact class: equals BPTT with the reset in the oracle
        reference = _bptt_with_reset(M.lif_step, params, hidden, xs, targets, 3, mask, new_hidden)
        for name in params:
            assert rel_err(got[name], reference[name]) <= 1e-10, name
    # The selected samples equal a fresh learner started there: counts restart.
    np.testing.assert_array_equal(mid.count, [0, 3, 0])
    fresh = learner.init(params, new_hidden, xs[0])
    for a, b in zip(jax.tree_util.tree_leaves(mid.traces), jax.tree_util.tree_leaves(fresh.traces)):
        np.testing.assert_array_equal(a[0], b[0])


def test_reset_never_lets_nan_through_and_keeps_other_samples_bit_identical():
    params = M.lif_params()
    hidden = M.hidden_like(("i", "v"), (B,))
    xs = jax.random.normal(jax.random.PRNGKey(2), (4, B, M.N_IN)).at[1, 0].set(jnp.nan)
    targets = jnp.zeros((4, B, 2))
    for algo in (bt.D_RTRL(), bt.pp_prop(0.7)):
        learner, state = _learner(M.lif_step, algo, params, hidden, xs[0])
        _, _, poisoned = jax.jit(learner.scan)(params, state, xs, targets)
        assert any(bool(jnp.isnan(a[0]).any()) for a in jax.tree_util.tree_leaves(poisoned))
        clean = jax.jit(learner.reset)(poisoned, jnp.array([True, False, False]))
        for new, old in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(poisoned)):
            assert bool(jnp.isfinite(new[0]).all())
            np.testing.assert_array_equal(new[1:], old[1:])  # bit-identical, NaN-free or not
        (loss, _), grads, after = jax.jit(learner.step)(params, clean, xs[0], targets[0])
        assert bool(jnp.isfinite(loss))
        for leaf in jax.tree_util.tree_leaves((grads, after)):
            assert bool(jnp.isfinite(leaf).all())


def test_reset_all_unbatched_and_bad_masks():
    params = M.lif_params()
    hidden = M.hidden_like(("i", "v"))
    learner = bt.compile(M.lif_step, M.mse, bt.D_RTRL(), batched=False)
    state = learner.init(params, hidden, jnp.ones(M.N_IN))
    _, _, state = learner.step(params, state, jnp.ones(M.N_IN), jnp.zeros(2))
    kept = learner.reset(state, jnp.asarray(False))
    for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)
    gone = learner.reset(state)
    assert all(not bool(jnp.any(a)) for a in jax.tree_util.tree_leaves(gone))
    with pytest.raises(ValueError, match="mask must be a scalar"):
        learner.reset(state, jnp.array([True, False]))
    with pytest.raises(ValueError, match="like state.hidden"):
        learner.reset(state, None, {"i": jnp.zeros(M.N)})


# -- clear errors -----------------------------------------------------------------------------


def test_batch_size_and_foreign_state_raise_braintrace_errors():
    step, params, hidden, xs, targets = _setup("rlif")
    learner, state = _learner(step, bt.D_RTRL(), params, hidden, xs[0])
    small = jax.tree_util.tree_map(lambda a: a[:2], hidden)
    with pytest.raises(ValueError, match="one leading batch size"):
        learner.step(params, state, xs[0][:2], targets[0][:2])
    with pytest.raises(ValueError, match="one leading batch size"):
        learner.step(params, state._replace(hidden=small), xs[0][:2], targets[0][:2])
    other = bt.compile(step, M.mse, bt.pp_prop(0.5), batched=True)
    with pytest.raises(ValueError, match="do not match"):
        other.step(params, state, xs[0], targets[0])


# -- ensembles and one evaluation -------------------------------------------------------------


@pytest.mark.slow
def test_vmap_over_an_ensemble_of_parameters():
    step, params, hidden, xs, targets = _setup("rlif", t=4)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 0.5 * a]), params)
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    states = jax.vmap(learner.init, in_axes=(0, None, None))(stacked, hidden, xs[0])
    run = jax.jit(jax.vmap(learner.scan, in_axes=(0, 0, None, None)))
    _, grads, _ = run(stacked, states, xs, targets)
    for member in range(2):
        one = jax.tree_util.tree_map(lambda a, m=member: a[m], stacked)
        _, alone, _ = jax.jit(learner.scan)(one, learner.init(one, hidden, xs[0]), xs, targets)
        for name in params:
            assert rel_err(grads[name][member], alone[name]) <= 1e-12


@pytest.mark.parametrize("algo", [bt.D_RTRL(), bt.pp_prop(0.9)], ids=lambda a: a.name)
def test_a_jitted_step_evaluates_each_etp_op_once(algo):
    step, params, hidden, xs, targets = _setup("gru")
    learner, state = _learner(step, algo, params, hidden, xs[0])
    jaxpr = jax.make_jaxpr(jax.jit(learner.step))(params, state, xs[0], targets[0])
    etp = [p for p in collect_primitives(jaxpr) if bt.registry.is_etp_primitive(p)]
    n_ops = len(learner.graph(params, hidden, xs[0]).ops)
    assert n_ops == 6 and len(etp) == n_ops, [p.name for p in etp]
