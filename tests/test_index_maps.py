"""Index maps: a fused op output that reaches the hidden group through element moves.

Oracles: BPTT by ``jax.grad`` through ``lax.scan`` (float64) and, for ``D_f``, a
``jax.jacfwd`` of the step written as a function of the op's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace as bt
from braintrace import ops
from braintrace.compiler import compile_graph, index_maps
from braintrace.compiler.forward import forward
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

N_IN, H, B, T = 3, 4, 2, 6


def _fused_lif(p, h, x):
    """A 2-state neuron whose two drives come from ONE fused kernel ``(in, 2H)``."""
    y = ops.dense(x, p["w"], p["b"])
    drive, gate = y[..., :H], y[..., H:]
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    i = 0.8 * h["i"] + drive
    v = tau * h["v"] * (1.0 - M.spike(h["v"] - 1.0)) + (1.0 - tau) * i * jax.nn.sigmoid(gate)
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]


def _fused_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "w": jax.random.normal(k[0], (N_IN, 2 * H)),
        "b": jnp.full((2 * H,), 0.2),
        "tau": jnp.linspace(-1.0, 1.0, H),
        "ro": jax.random.normal(k[1], (H, 2)) * 0.5,
    }


def _data(lead, seed=4):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    hidden = {"i": jnp.zeros(lead + (H,)), "v": 0.5 * jnp.ones(lead + (H,))}
    return (
        hidden,
        jax.random.normal(k1, (T,) + lead + (N_IN,)),
        jax.random.normal(k2, (T,) + lead + (2,)),
    )


@pytest.mark.parametrize("mode", ["unbatched", "batched", "vmapped"])
def test_fused_kernel_sliced_into_gates_is_exact(mode):
    step = jax.vmap(_fused_lif, in_axes=(None, 0, 0)) if mode == "vmapped" else _fused_lif
    batched = mode != "unbatched"
    params = _fused_params()
    hidden, xs, targets = _data((B,) if batched else ())
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=batched, strict=True)
    report = learner.report(params, hidden, xs[0])
    assert report.param("['w']").mode == "trace" and report.param("['w']").gradient == "exact"
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, batched)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name
    # pp_prop trains the fused kernel too, and equals D-RTRL at T = 1.
    pp = bt.compile(step, M.mse, bt.pp_prop(0.7), batched=batched)
    _, g_pp, _ = pp.scan(params, pp.init(params, hidden, xs[0]), xs[:1], targets[:1])
    _, g_dr, _ = learner.scan(params, state, xs[:1], targets[:1])
    assert rel_err(g_pp["w"], g_dr["w"]) <= 1e-12


def test_without_the_index_map_the_fused_kernel_would_be_wrong():
    """Negative control: the one-step gradient (what a cut relation gives) is far off."""
    params = _fused_params()
    hidden, xs, targets = _data((B,))
    one = bt.compile(_fused_lif, M.mse, bt.OneStep(), batched=True)
    _, grads, _ = one.scan(params, one.init(params, hidden, xs[0]), xs, targets)
    reference = bptt_grad(_fused_lif, M.mse, params, hidden, xs, targets, True)
    assert rel_err(grads["w"], reference["w"]) > 1e-2


def _swap_concat(y):
    return jnp.concatenate([y[..., H:], y[..., :H]], axis=-1)


MAPS = {
    "slice": lambda y: (y[..., :H], y[..., H:]),
    "reshape": lambda y: tuple(jnp.moveaxis(y.reshape(y.shape[:-1] + (2, H)), -2, 0)),
    "concatenate": lambda y: (_swap_concat(y)[..., :H], _swap_concat(y)[..., H:]),
}


def _map_step(split):
    def from_y(h, y):
        a, g = split(y)
        return 0.6 * h + jnp.tanh(a) * jax.nn.sigmoid(g) + 0.1 * h * g

    def step(p, h, x):
        h = from_y(h, ops.dense(x, p["w"]))
        return h, h.sum(-1)

    return step, from_y


@pytest.mark.parametrize("kind", sorted(MAPS))
def test_d_and_df_match_jacfwd_through_element_moves(kind):
    step, from_y = _map_step(MAPS[kind])
    k = jax.random.split(jax.random.PRNGKey(1), 3)
    p = {"w": jax.random.normal(k[0], (N_IN, 2 * H))}
    h = jax.random.normal(k[1], (H,))
    x = jax.random.normal(k[2], (N_IN,))
    graph = compile_graph(step, p, h, x)
    (relation,) = graph.relations
    assert relation.index_map is not None
    _, _, parts = forward(graph, p, h, x)
    y = x @ p["w"]
    d_oracle = jax.jacfwd(from_y, argnums=0)(h, y)  # (H, H): diagonal
    np.testing.assert_allclose(parts.d[0][:, 0, 0], jnp.diag(d_oracle), rtol=1e-12)
    df_oracle = jax.jacfwd(from_y, argnums=1)(h, y)  # (H, 2H)
    where = np.asarray(relation.index_map)
    assert sorted(np.bincount(where)) == [2] * H  # every position is reached twice
    expected = df_oracle[where, np.arange(2 * H)]
    np.testing.assert_allclose(parts.df[0][:, 0], expected, rtol=1e-12, atol=1e-14)
    # Every other entry of the Jacobian is zero: the map is exact.
    off = np.ones_like(df_oracle, bool)
    off[where, np.arange(2 * H)] = False
    assert float(jnp.abs(df_oracle[off]).max()) == 0.0


def test_an_element_reaching_two_positions_gets_no_relation():
    def step(p, h, x):
        y = ops.dense(x, p["w"])  # H outputs, each used at two positions: roll
        h = 0.5 * h + jnp.tanh(y) + 0.3 * jnp.roll(y, 1)
        return h, h.sum()

    p = {"w": jnp.ones((N_IN, H))}
    graph = compile_graph(step, p, jnp.zeros(H), jnp.ones(N_IN))
    assert graph.relations == () or all(r.index_map is None for r in graph.relations)
    entry = graph.report.param("['w']")
    assert entry.gradient != "exact"


def test_constant_index_gather_is_an_index_map():
    perm = jnp.array([3, 0, 2, 1, 7, 4, 6, 5])

    def step(p, h, x):
        y = jnp.take(ops.dense(x, p["w"]), perm, axis=-1)
        h = 0.7 * h + jnp.tanh(y[..., :H]) * y[..., H:]
        return h, h.sum(-1)

    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (N_IN, 2 * H))}
    hidden = jnp.zeros((B, H))
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, B, N_IN))
    targets = jnp.zeros((T, B))
    loss = lambda out, y: (out - y) ** 2  # noqa: E731
    learner = bt.compile(step, loss, bt.D_RTRL(), batched=True, strict=True)
    _, grads, _ = learner.scan(params, learner.init(params, hidden, xs[0]), xs, targets)
    reference = bptt_grad(step, loss, params, hidden, xs, targets, True)
    assert rel_err(grads["w"], reference["w"]) <= 1e-10


@pytest.mark.parametrize("layout", ["gates", "scattered"])
def test_take_mapped_equals_a_numpy_gather(layout):
    """Runs of slices (a fused-gate map) and the gather fallback (a scattered map) pick
    ``sources[classes[j]][..., where[j], ...]`` and zero for ``where[j] = -1``."""
    rng = np.random.default_rng(0)
    sources = [rng.normal(size=(2, 6, 3)) for _ in range(3)]  # (lead, positions, tail)
    if layout == "gates":
        where = np.array([0, 1, 2, 3, 4, 5] * 3 + [-1, -1])
        classes = np.repeat([0, 1, 2, 0], [6, 6, 6, 2])
    else:
        where = rng.integers(-1, 6, size=80)
        classes = rng.integers(0, 3, size=80)
    got = np.asarray(index_maps.take_mapped([jnp.asarray(s) for s in sources], classes, where, 1))
    want = np.stack(
        [sources[c][:, p] if p >= 0 else np.zeros((2, 3)) for c, p in zip(classes, where)], 1
    )
    np.testing.assert_array_equal(got, want)
    assert (len(index_maps._runs(classes, where)) <= index_maps._MAX_RUNS) == (layout == "gates")
