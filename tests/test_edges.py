"""The edges a new user hits: an empty sequence, a window longer than the sequence, an
RNN learner given the whole sequence at ``init``, and a ragged batch.

Oracles: BPTT by ``jax.grad`` (float64) of each sample alone over its own length, and
the model stepped by hand; never the learner itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import braintrace as bt
import braintrace_flax as btf
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad
from braintrace_flax import nnx as btnnx
from oracles import rel_err

B, T = 3, 7
LENGTHS = np.array([7, 4, 2])  # per sample; steps past a length are padding
ALGORITHMS = [bt.D_RTRL(), bt.pp_prop(0.8), bt.OneStep(), bt.BPTT()]
_leaves = jax.tree_util.tree_leaves


def _lif_setup(seed=3):
    params = M.lif_params(seed=1)
    hidden = M.hidden_like(("i", "v"), (B,), seed=seed)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    return params, hidden, jax.random.normal(k1, (T, B, M.N_IN)), jax.random.normal(k2, (T, B, 2))


def _learner(algo, params, hidden, x0, step=M.lif_step):
    learner = bt.compile(step, M.mse, algo, batched=True)
    return learner, learner.init(params, hidden, x0)


# -- T = 0 and a window longer than T ------------------------------------------------------


@pytest.mark.parametrize(
    "algo",
    [
        a if a.name in ("d_rtrl", "bptt") else pytest.param(a, marks=pytest.mark.slow)
        for a in ALGORITHMS
    ],
    ids=lambda a: a.name,
)
def test_an_empty_sequence_returns_nothing_and_keeps_the_state(algo):
    params, hidden, xs, targets = _lif_setup()
    learner, state = _learner(algo, params, hidden, xs[0])
    empty = (xs[:0], targets[:0])
    runs = {
        f"scan(window={w})": jax.jit(lambda p, s, x, y, w=w: learner.scan(p, s, x, y, window=w))
        for w in (None, 1, 3)
    }
    runs["window"] = jax.jit(learner.window)
    runs["eager scan"] = learner.scan
    for name, run in runs.items():
        (losses, outs), grads, new = run(params, state, *empty)
        assert losses.shape == (0,) and outs.shape == (0, B, 2), name
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
        assert all(
            g.dtype == p.dtype and not g.any() for g, p in zip(_leaves(grads), _leaves(params))
        )
        for a, b in zip(_leaves(new), _leaves(state), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


# -- an RNN's learner given the whole sequence -------------------------------------------------


def test_rnn_learners_take_the_whole_sequence_at_init():
    xs = jnp.ones((B, 5, 3), jnp.float32)  # batch-major, as the RNN itself is called
    carry = jnp.zeros((B, 4), jnp.float32)
    rnn = nn.RNN(nn.GRUCell(4))
    params = rnn.init(jax.random.key(1), xs)["params"]
    linen = btf.compile(rnn, M.mse, bt.D_RTRL(), convert_dense=True)
    cell = btnnx.convert(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)))
    nnx_learner = btnnx.compile(nnx.RNN(cell), M.mse, bt.D_RTRL())
    for learner, model in ((linen, params), (nnx_learner, nnx.RNN(cell))):
        whole = learner.init(model, carry, xs)  # the sequence: its first step is used
        first = learner.init(model, carry, xs[:, 0])
        for a, b in zip(_leaves(whole), _leaves(first), strict=True):
            np.testing.assert_array_equal(a, b)
        assert (
            learner.report(model, carry, xs)
            .param(
                "['cell']['ir']['kernel']" if learner is linen else "['cell']['dense_i']['kernel']"
            )
            .mode
            == "trace"
        )
        with pytest.raises(ValueError, match=r"x must be one step's input of the RNN's cell"):
            learner.init(model, carry, jnp.ones((B, 5, 7), jnp.float32))  # 7 features: neither


# -- a ragged batch ----------------------------------------------------------------------------


def _ragged(xs, targets, fill):
    """Inputs and targets with every step past a sample's length replaced by ``fill``."""
    active = jnp.arange(T)[:, None] < jnp.asarray(LENGTHS)[None, :]
    pad = lambda a: jnp.where(active[..., None], a, fill)  # noqa: E731
    return pad(xs), pad(targets), active


@pytest.fixture(scope="module")
def alone():
    """Per sample, alone over its own length: BPTT's gradient (the batch mean of them)
    and the hidden state after its last real step (the model stepped by hand)."""
    params, hidden, xs, targets = _lif_setup()
    grads, ends = [], []
    for b, n in enumerate(LENGTHS):
        h = jax.tree_util.tree_map(lambda a, b=b: a[b], hidden)
        grads.append(bptt_grad(M.lif_step, M.mse, params, h, xs[:n, b], targets[:n, b], False))
        for t in range(n):
            h, _ = M.lif_step(params, h, xs[t, b])
        ends.append(h)
    grad = jax.tree_util.tree_map(lambda *g: sum(g) / B, *grads)
    return grad, jax.tree_util.tree_map(lambda *h: jnp.stack(h), *ends)


def _matches(alone, grads, final) -> bool:
    grad, ends = alone
    return all(rel_err(grads[k], grad[k]) <= 1e-10 for k in grad) and all(
        np.allclose(final.hidden[k], ends[k], rtol=1e-12, atol=1e-12) for k in ends
    )


@pytest.mark.parametrize(
    "algo, window",
    [
        (bt.D_RTRL(), None),
        (bt.pp_prop(0.8), 100),
        pytest.param(bt.BPTT(), None, marks=pytest.mark.slow),
    ],
    ids=["d_rtrl-per-step", "pp_prop-window-longer-than-T", "bptt"],
)
def test_padded_steps_change_neither_the_gradient_nor_the_ended_samples(alone, algo, window):
    """LIF is D-RTRL's exact class and one window (``window > T`` included) is BPTT, so
    the gradient is the mean of every sample's own BPTT gradient over its own length;
    each sample ends in the state of its last real step, whatever the padding holds."""
    params, hidden, xs, targets = _lif_setup()
    learner, state = _learner(algo, params, hidden, xs[0])
    scan = jax.jit(lambda p, s, x, y, a: learner.scan(p, s, x, y, window=window, active=a))
    runs = [scan(params, state, *_ragged(xs, targets, fill)) for fill in (0.0, 1e3)]
    for (losses, _), grads, final in runs:
        assert losses.shape == (T,) and _matches(alone, grads, final)
        np.testing.assert_array_equal(final.count, LENGTHS)
    # The padding's values never leak (the outputs at padded steps are the model's own).
    kept = [(losses, grads, final) for (losses, _), grads, final in runs]
    for a, b in zip(_leaves(kept[0]), _leaves(kept[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    if window is None and algo.traced:  # negative control: the same run without active
        plain = jax.jit(lambda p, s, x, y: learner.scan(p, s, x, y, window=window))
        _, grads, final = plain(params, state, *_ragged(xs, targets, 0.0)[:2])
        assert not _matches(alone, grads, final)


@pytest.mark.slow
def test_windows_keep_the_traces_of_ended_samples():
    """pp_prop in windows of 3 (samples end inside a window): every sample's whole state
    at the end is the one the same learner reaches on its real steps alone."""
    params, hidden, xs, targets = _lif_setup()
    learner, state = _learner(bt.pp_prop(0.8, warmup_correction=True), params, hidden, xs[0])
    run = jax.jit(lambda p, s, x, y, a: learner.scan(p, s, x, y, window=3, active=a))
    _, _, final = run(params, state, *_ragged(xs, targets, 0.0))
    for b, n in enumerate(LENGTHS):
        _, _, own = run(params, state, xs[:n], targets[:n], None)
        for got, want in zip(_leaves(final), _leaves(own), strict=True):
            np.testing.assert_allclose(got[b], want[b], rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_active_is_checked_and_forwarded_by_the_faces():
    params, hidden, xs, targets = _lif_setup()
    learner, state = _learner(bt.D_RTRL(), params, hidden, xs[0])
    with pytest.raises(ValueError, match=r"active must be a boolean array of shape \(7, 3\)"):
        learner.scan(params, state, xs, targets, active=jnp.ones((T, B)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        learner.step(params, state, xs[0], targets[0], active=jnp.ones(T, bool))
    rnn = nn.RNN(nn.GRUCell(4))  # the RNN's layout: active is (batch, time) too
    seq = jnp.ones((B, T, 3), jnp.float32)
    rnn_params = rnn.init(jax.random.key(1), seq)["params"]
    seq_learner = btf.compile(rnn, M.mse, bt.D_RTRL(), convert_dense=True)
    st = seq_learner.init(rnn_params, jnp.zeros((B, 4), jnp.float32), seq)
    _, _, end = jax.jit(seq_learner.scan)(
        rnn_params,
        st,
        seq,
        jnp.zeros((B, T, 4), jnp.float32),
        active=jnp.asarray(np.arange(T) < LENGTHS[:, None]),
    )
    np.testing.assert_array_equal(end.count, LENGTHS)
