"""The LRU cell (``braintrace.lru`` and ``ETPLRUCell`` in every face).

Oracles: complex arithmetic for the step (numpy ``complex128``), BPTT by ``jax.grad``
through ``lax.scan`` in float64 for the gradients. One LRU layer is in the exact class,
so D-RTRL's summed gradient must equal BPTT's to 1e-10, for the plain and the gated
drive, in all three faces; the no-trace gradient (``OneStep``) must not (negative
control). A stack of two layers: the compile report says the top layer is exact and
names the lower one approximate, because its state feeds the top layer's group.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import F64, mse

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace import lru
from braintrace.testing.reference import bptt_grad
from braintrace_flax import nnx as btnnx
from oracles import rel_err

T, B, N_IN, H = 7, 3, 2, 3


def _data(seed=0, lead=(B,)):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    xs = jax.random.normal(k1, (T, *lead, N_IN), F64)
    return xs, jax.random.normal(k2, (T, *lead, 2), F64)


def _state(lead=(B,), seed=5):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, (*lead, H), F64), jax.random.normal(k2, (*lead, H), F64)


# -- the math -------------------------------------------------------------------------------


def test_step_is_the_complex_recurrence():
    """``lru_step`` on real pairs equals ``lambda h + sqrt(1 - |lambda|^2) u`` in complex."""
    rng = np.random.default_rng(0)
    re, im, u_re, u_im = rng.normal(size=(4, 5))
    mag, arg = rng.uniform(0.1, 0.99, 5), rng.uniform(-3.0, 3.0, 5)
    lam = mag * np.exp(1j * arg)
    want = lam * (re + 1j * im) + np.sqrt(1.0 - mag**2) * (u_re + 1j * u_im)
    got = lru.lru_step(*(jnp.asarray(a, F64) for a in (re, im, u_re, u_im, mag, arg)))
    np.testing.assert_allclose(np.asarray(got[0]), want.real, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(np.asarray(got[1]), want.imag, rtol=1e-14, atol=1e-14)


def test_normalisation_keeps_the_stationary_size_of_the_state():
    """With white-noise drive, ``E|h|^2 = gamma^2 |u|^2 / (1 - r^2) = |u|^2`` for every r."""
    mags = jnp.array([0.3, 0.9, 0.99, 0.999], F64)
    noise = jax.random.normal(jax.random.PRNGKey(0), (12000, 2, 4), F64)

    def step(h, u):
        h = lru.lru_step(*h, u[0], u[1], mags, jnp.full(4, 0.7, F64))
        return h, h[0] ** 2 + h[1] ** 2

    _, power = jax.lax.scan(step, (jnp.zeros(4, F64), jnp.zeros(4, F64)), noise)
    np.testing.assert_allclose(np.asarray(power[4000:].mean(0)), 2.0, rtol=0.2)


def test_ring_initialisation_and_its_errors():
    key = jax.random.PRNGKey(0)
    mag = lru.magnitude(lru.nu_log_init(0.4, 0.95)(key, (4000,), F64))
    assert 0.4 - 1e-9 <= float(mag.min()) and float(mag.max()) <= 0.95 + 1e-9
    # uniform on the ring's area: |lambda|^2 uniform, so its mean is the midpoint
    assert abs(float(jnp.mean(mag**2)) - (0.4**2 + 0.95**2) / 2) < 0.01
    arg = lru.phase(lru.theta_log_init(0.5)(key, (4000,), F64))
    assert 0 < float(arg.min()) and float(arg.max()) <= 0.5 and float(arg.mean()) > 0.2
    for r_min, r_max in ((0.5, 1.0), (0.9, 0.5), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="r_min <= r_max|r_min < r_max"):
            btf.ETPLRUCell(4, r_min=r_min, r_max=r_max).init(
                jax.random.key(0), (jnp.zeros(4), jnp.zeros(4)), jnp.zeros(2)
            )
    with pytest.raises(ValueError, match=r"braintrace_eqx.ETPLRUCell\(2, 4\).*r_max=1.0"):
        bte.ETPLRUCell(2, 4, r_max=1.0, key=key)
    with pytest.raises(ValueError, match=r"ETPLRUCell\(2, 4\): max_phase"):
        btnnx.ETPLRUCell(2, 4, max_phase=0.0, rngs=nnx.Rngs(0))


# -- one layer: D-RTRL is BPTT ----------------------------------------------------------------


class Readout(nn.Module):
    """An LRU layer and a linear readout of its output (the features ``[re, im]``)."""

    gated: bool = False

    @nn.compact
    def __call__(self, carry, x):
        cell = btf.ETPLRUCell(H, r_min=0.5, gated=self.gated, param_dtype=F64, name="lru")
        carry, y = cell(carry, x)
        return carry, nn.Dense(2, param_dtype=F64, name="readout")(y)


def _scan(learner, params, hidden, xs, targets):
    state = learner.init(params, hidden, xs[0])
    return jax.jit(learner.scan)(params, state, xs, targets)[1]


@pytest.mark.slow
def test_one_linen_layer_drtrl_equals_bptt():
    """The plain drive here; the gated one in the Equinox test (the math is shared)."""
    model = Readout()
    xs, targets = _data()
    hidden = _state()
    params = model.init(jax.random.key(1), hidden, xs[0])["params"]
    learner = btf.compile(model, mse, bt.D_RTRL())
    report = learner.report(params, hidden, xs[0])
    assert [g.num_states for g in report.groups] == [2]  # re and im: one group, S = 2
    for path, row in ((p, report.param(p)) for p in _paths(params)):
        assert row.gradient == "exact", (path, row)
    reference = bptt_grad(btf.make_step(model), mse, params, hidden, xs, targets, True)
    grads = _scan(learner, params, hidden, xs, targets)
    for path, got, want in _pairs(grads, reference):
        assert rel_err(got, want) <= 1e-10, path
    # Negative control: without traces the recurrent parameters' gradients are wrong.
    truncated = _scan(btf.compile(model, mse, bt.OneStep()), params, hidden, xs, targets)
    for name in ("input", "nu", "theta"):
        got, want = truncated["lru"][name], reference["lru"][name]
        assert max(rel_err(a, b) for _, a, b in _pairs(got, want)) > 1e-3, name


def _paths(params):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def _pairs(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves(b)
    assert len(flat_a) == len(flat_b)
    return [(jax.tree_util.keystr(p), x, y) for (p, x), y in zip(flat_a, flat_b)]


class EqxNet(eqx.Module):
    cell: bte.ETPLRUCell
    readout: eqx.nn.Linear

    def __call__(self, x, hidden):
        hidden = self.cell(x, hidden)
        return hidden, self.readout(self.cell.output(hidden))


def test_one_equinox_layer_drtrl_equals_bptt():
    """``rel_err`` refuses a zero reference, so no leaf passes by being zero on both sides."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    cell = bte.ETPLRUCell(N_IN, H, r_min=0.5, gated=True, dtype=F64, key=k1)
    net = EqxNet(cell, eqx.nn.Linear(2 * H, 2, dtype=F64, key=k2))
    xs, targets = _data(1)
    hidden = _state()
    learner = bte.compile(net, mse, bt.D_RTRL())
    state = learner.init(net, hidden, xs[0])
    grads = eqx.filter_jit(learner.scan)(net, state, xs, targets)[1]
    params, rebuild = eqx.partition(net, eqx.is_inexact_array)

    def loss(p):
        model = eqx.combine(p, rebuild)

        def step(h, xy):
            h, out = jax.vmap(model)(xy[0], h)
            return h, jnp.mean(jax.vmap(mse)(out, xy[1]))

        return jax.lax.scan(step, hidden, (xs, targets))[1].sum()

    reference = jax.grad(loss)(params)
    for path, got, want in _pairs(eqx.filter(grads, eqx.is_inexact_array), reference):
        assert rel_err(got, want) <= 1e-10, path


@pytest.mark.slow
def test_one_nnx_layer_drtrl_equals_bptt():
    cell = btnnx.ETPLRUCell(N_IN, H, r_min=0.5, param_dtype=F64, rngs=nnx.Rngs(3))
    xs, targets = _data(2)
    hidden = _state()
    learner = btnnx.compile(cell, lambda y, t: mse(y[:2], t), bt.D_RTRL())
    state = learner.init(cell, hidden, xs[0])
    grads = nnx.jit(learner.scan)(cell, state, xs, targets)[1]
    graphdef, params = nnx.split(cell, nnx.Param)

    def loss(p):
        model = nnx.merge(graphdef, p)

        def step(h, xy):
            h, y = model(h, xy[0])
            return h, jnp.mean(jax.vmap(mse)(y[:, :2], xy[1]))

        return jax.lax.scan(step, hidden, (xs, targets))[1].sum()

    reference = jax.grad(loss)(params)
    got, want = nnx.to_pure_dict(grads), nnx.to_pure_dict(reference)
    for path, a, b in _pairs(got, want):
        assert rel_err(a, b) <= 1e-10, path


# -- the faces are one layer ----------------------------------------------------------------


def test_lru_is_the_same_layer_in_linen_nnx_and_equinox():
    """Same parameters in, same states and outputs out, step after step."""
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    kernel, gate = (jax.random.normal(k[i], (N_IN, 2 * H), F64) for i in (0, 1))
    bias, gate_bias = (0.3 * jax.random.normal(k[i], (2 * H,), F64) for i in (2, 3))
    nu, theta = jnp.linspace(-2.0, 0.5, H, dtype=F64), jnp.linspace(-1.0, 1.0, H, dtype=F64)
    params = {
        "input": {"kernel": kernel, "bias": bias},
        "gate": {"kernel": gate, "bias": gate_bias},
        "nu": {"weight": nu},
        "theta": {"weight": theta},
    }
    linen = btf.ETPLRUCell(H, gated=True, param_dtype=F64)
    shapes = linen.init(jax.random.key(0), _state(()), jnp.zeros(N_IN))["params"]
    assert jax.tree_util.tree_map(jnp.shape, shapes) == jax.tree_util.tree_map(jnp.shape, params)

    cell = btnnx.ETPLRUCell(N_IN, H, gated=True, param_dtype=F64, rngs=nnx.Rngs(0))
    nnx.update(cell, nnx.State(jax.tree_util.tree_map(nnx.Param, params)))
    equinox = bte.ETPLRUCell(N_IN, H, gated=True, dtype=F64, key=k[4])
    arrays = (kernel.T, bias, gate.T, gate_bias, nu, theta)  # Equinox's (out, in) layout
    equinox = eqx.tree_at(
        lambda c: (
            c.input.weight,
            c.input.bias,
            c.gate.weight,
            c.gate.bias,
            c.nu.weight,
            c.theta.weight,
        ),
        equinox,
        arrays,
    )
    state = {face: _state(()) for face in ("linen", "nnx", "eqx")}
    for x in 1.5 * jax.random.normal(k[5], (6, N_IN), F64):
        state["linen"], y = linen.apply({"params": params}, state["linen"], x)
        state["nnx"], y_nnx = cell(state["nnx"], x)
        state["eqx"] = equinox(x, state["eqx"])
        for other in ("nnx", "eqx"):
            for a, b in zip(state[other], state["linen"], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(y_nnx, y, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(equinox.output(state["eqx"]), y, rtol=1e-13, atol=1e-13)
    assert float(jnp.abs(y).max()) > 0.1


# -- stacks ---------------------------------------------------------------------------------


class Stack(nn.Module):
    @nn.compact
    def __call__(self, carry, x):
        low, top = carry
        low, y = btf.ETPLRUCell(H, r_max=0.9, param_dtype=F64, name="low")(low, x)
        top, y = btf.ETPLRUCell(H, gated=True, param_dtype=F64, name="top")(top, y)
        return (low, top), nn.Dense(2, param_dtype=F64, name="readout")(y)


def test_a_stack_reports_the_top_layer_exact_and_the_lower_one_approximate():
    model = Stack()
    hidden = (_state(), _state(seed=6))
    xs, _ = _data()
    params = model.init(jax.random.key(0), hidden, xs[0])["params"]
    report = btf.compile(model, mse, bt.D_RTRL()).report(params, hidden, xs[0])
    assert [g.num_states for g in report.groups] == [2, 2]
    for path in _paths(params):
        row = report.param(path)
        if path.startswith("['low']"):
            assert row.gradient == "approximate", (path, row)
            assert "group" in row.reason, row.reason  # it names the group it feeds
        else:
            assert row.gradient == "exact", (path, row)
    assert "truncated" not in {report.param(p).gradient for p in _paths(params)}
