"""Control flow through the Flax faces: linen ``nn.cond`` / ``nn.scan`` and NNX
``nnx.cond`` / ``nnx.fori_loop`` train with BPTT's gradient (exact class, float64)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace.testing.reference import bptt_grad
from braintrace_flax import nnx as btnnx

F64 = jnp.float64
N_IN, N, T, SUB = 3, 4, 5, 3


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _reset(flag, i, v):
    return (0.0 * i, 0.0 * v) if flag else (i, v)


def _lif(i, v, y):
    i = 0.8 * i + y
    return i, 0.9 * v * (1.0 - bt.spike(v - 1.0)) + 0.1 * i


class NNXSubsteps(nnx.Module):
    def __init__(self, rngs):
        self.drive = btnnx.ETPLinear(N_IN, N, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        i, v = nnx.cond(
            x[0] > 1.0, lambda m, i, v: _reset(True, i, v), lambda m, i, v: (i, v), self, *carry
        )

        def body(_, state):
            m, i, v = state
            return (m, *_lif(i, v, m.drive(x)))

        _, i, v = nnx.fori_loop(0, SUB, body, (self, i, v))
        return (i, v), v


class LinenSubsteps(nn.Module):
    @nn.compact
    def __call__(self, carry, x):
        i, v = nn.cond(
            x[0] > 1.0, lambda m, i, v: _reset(True, i, v), lambda m, i, v: (i, v), self, *carry
        )
        drive = btf.ETPDense(N, param_dtype=F64)

        def body(mdl, c, _):
            return _lif(*c, mdl(x)), None

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=SUB)
        (i, v), _ = scan(drive, (i, v), None)
        return (i, v), v


def _plain_step(p, carry, x):
    """The same step in plain JAX (the oracle's; NNX modules cannot be merged inside
    the oracle's scan when they hold an ``nnx.cond``)."""
    i, v = carry
    i, v = jax.lax.cond(x[0] > 1.0, lambda i, v: _reset(True, i, v), lambda i, v: (i, v), i, v)
    for _ in range(SUB):
        i, v = _lif(i, v, x @ p["kernel"] + p["bias"])
    return (i, v), v


def _data():
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    xs = 1.5 * jax.random.normal(k[0], (T, N_IN), F64)
    carry = tuple(0.5 * jax.random.normal(kk, (N,), F64) for kk in jax.random.split(k[1]))
    return carry, xs, jax.random.normal(k[2], (T, N), F64)


def _close(grads, reference):
    got, want = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(reference)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.abs(w).max() > 1e-6
        assert np.abs(np.asarray(g) - w).max() <= 1e-10 * np.abs(w).max()


def test_nnx_cond_and_fori_loop_equal_bptt():
    carry, xs, targets = _data()
    assert bool((xs[:, 0] > 1.0).any()) and bool((xs[:, 0] <= 1.0).any())
    model = NNXSubsteps(nnx.Rngs(0))
    learner = btnnx.compile(model, mse, bt.D_RTRL(), batched=False)
    kinds = [row[1] for row in learner.report(model, carry, xs[0]).control_flow]
    assert kinds == ["inlined", "composed"]
    state = learner.init(model, carry, xs[0])
    _, grads, _ = nnx.jit(lambda m, s, x, y: learner.scan(m, s, x, y))(model, state, xs, targets)
    params = nnx.as_pure(nnx.state(model, nnx.Param))["drive"]
    reference = bptt_grad(_plain_step, mse, params, carry, xs, targets, False)
    _close(nnx.as_pure(grads)["drive"], reference)


def test_linen_cond_and_scan_equal_bptt():
    carry, xs, targets = _data()
    module = LinenSubsteps()
    params = module.init(jax.random.PRNGKey(0), carry, xs[0])["params"]
    learner = btf.compile(module, mse, bt.D_RTRL(), batched=False)
    kinds = [row[1] for row in learner.report(params, carry, xs[0]).control_flow]
    assert kinds == ["inlined", "composed"]
    state = learner.init(params, carry, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)

    def step(p, h, x):
        return module.apply({"params": p}, h, x)

    _close(grads, bptt_grad(step, mse, params, carry, xs, targets, False))


def test_equinox_example_with_substeps_is_composed_and_exact():
    """``examples/eqx_lif_snn.py --substeps 3``: the LIF cell inside a fori_loop."""
    import argparse

    from helpers import load_example

    example = load_example("eqx_lif_snn")
    args = argparse.Namespace(hidden=N, substeps=3)
    model = example.init_model(jax.random.PRNGKey(0), N_IN, args)
    learner = bte.compile(model, example.cross_entropy, bt.D_RTRL())
    hidden = example.zero_state(2, N)
    report = learner.report(model, hidden, jnp.ones((2, N_IN)))
    assert [row[1] for row in report.control_flow] == ["composed"]
    assert {e.gradient for e in report.params} == {"exact"}
