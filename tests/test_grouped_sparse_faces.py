"""The grouped and sparse dense layers of each face (linen, NNX, Equinox).

For each face, a state driven directly by the face's grouped and sparse layers (exact
class): the face's learner's summed gradient equals BPTT's (``jax.grad`` through
``lax.scan`` over the face's own forward pass, float64, 1e-10) -- D-RTRL on a LIF
membrane for linen and Equinox, pp_prop with zero decay on a ``D = 0`` state for NNX.
Also: forward passes against the core ops on the same arrays, parameter names and
shapes, and errors that name the layer.
"""

from __future__ import annotations

import doctest
import importlib

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace import ops
from braintrace.surrogate import spike
from braintrace_flax import nnx as btnnx

F64 = jnp.float64
N_IN, N, G, T, B = 4, 6, 2, 4, 2
INDICES = np.array([[0, 0], [0, 3], [1, 1], [1, 4], [2, 2], [2, 5], [3, 0], [3, 5], [2, 4]])
TAU = jnp.linspace(0.3, 0.9, N)


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _lif(i, v, drive):
    i = 0.8 * i + drive
    v = TAU * v * (1.0 - spike(v - 1.0)) + (1.0 - TAU) * i
    return i, v


def _data(lead):
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    carry = (jax.random.normal(k[0], lead + (N,), F64), jax.random.normal(k[1], lead + (N,), F64))
    xs = 2.0 * jax.random.normal(k[2], (T,) + lead + (N_IN,), F64)
    return carry, xs, jax.random.normal(k[3], (T,) + lead + (2,), F64)


def _bptt(step, params, carry, xs, targets, batched):
    def total(p):
        def body(h, inputs):
            h, out = step(p, h, inputs[0])
            loss = jax.vmap(mse)(out, inputs[1]).mean() if batched else mse(out, inputs[1])
            return h, loss

        return lax.scan(body, carry, (xs, targets))[1].sum()

    return jax.grad(total)(params)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _assert_equal_trees(got, want):
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert flat_got.keys() == flat_want.keys()
    for path, value in flat_want.items():
        assert _rel(flat_got[path], value) < 1e-10, (jax.tree_util.keystr(path), flat_got[path])


# -- linen ---------------------------------------------------------------------------------


class LinenLIF(nn.Module):
    @nn.compact
    def __call__(self, carry, x):
        drive = btf.ETPGroupedDense(N, groups=G, param_dtype=F64, name="grouped")(x)
        drive = drive + btf.ETPSparseDense(N, INDICES, param_dtype=F64, name="sparse")(x)
        i, v = _lif(*carry, drive)
        return (i, v), nn.Dense(2, param_dtype=F64, name="readout")(jnp.tanh(v))


@pytest.mark.slow  # about 2 s each; NNX's twin runs by default
def test_linen_layers_train_exactly_and_match_the_core_ops():
    model = LinenLIF()
    carry, xs, targets = _data((B,))
    params = model.init(jax.random.key(0), carry, xs[0])["params"]
    assert params["grouped"]["kernel"].shape == (G, N_IN // G, N // G)
    assert params["sparse"]["values"].shape == (len(INDICES),)
    assert sorted(params["sparse"]) == ["bias", "values"]
    sp = params["sparse"]
    y = btf.ETPSparseDense(N, INDICES).apply({"params": sp}, xs[0])
    want = ops.sparse_dense(xs[0], sp["values"], INDICES, (N_IN, N), sp["bias"])
    np.testing.assert_array_equal(y, want)
    learner = btf.compile(model, mse, bt.D_RTRL())
    report = learner.report(params, carry, xs[0])
    for path in ("grouped']['kernel", "grouped']['bias", "sparse']['values", "sparse']['bias"):
        assert report.param(f"['{path}']").mode == "trace", path
    _, grads, _ = learner.scan(params, learner.init(params, carry, xs[0]), xs, targets)
    _assert_equal_trees(grads, _bptt(btf.make_step(model), params, carry, xs, targets, True))


# -- NNX -------------------------------------------------------------------------------------


class NnxDrive(nnx.Module):
    """Grouped and sparse layers into a state that keeps no memory of its own (``D = 0``)."""

    def __init__(self, rngs):
        self.grouped = btnnx.ETPGroupedLinear(N_IN, N, G, param_dtype=F64, rngs=rngs)
        self.sparse = btnnx.ETPSparseLinear(N_IN, N, INDICES, param_dtype=F64, rngs=rngs)
        self.readout = nnx.Linear(N, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, h, x):
        h = jnp.tanh(self.grouped(x) + self.sparse(x) + 0.0 * h)
        return h, self.readout(h)


def test_nnx_layers_train_exactly_by_pp_prop_with_zero_decay():
    """With ``D = 0`` and ``alpha = 0`` pp_prop's factorised trace is exact: it runs the
    ops' ``xy_to_dw`` credit at ``(epsx, ghat)`` and must give BPTT's gradient."""
    model = NnxDrive(nnx.Rngs(0))
    (h, _), xs, targets = _data(())
    learner = btnnx.compile(model, mse, bt.pp_prop(0.0), batched=False)
    _, grads, _ = learner.scan(model, learner.init(model, h, xs[0]), xs, targets)
    graphdef, params = nnx.split(model, nnx.Param)

    def step(p, h, x):
        return nnx.merge(graphdef, p)(h, x)

    want = _bptt(step, nnx.as_pure(params), h, xs, targets, False)
    _assert_equal_trees(nnx.as_pure(grads), want)
    assert set(nnx.as_pure(params)["sparse"]) == {"values", "bias"}


# -- Equinox -----------------------------------------------------------------------------------


class EqxLIF(eqx.Module):
    grouped: bte.ETPGroupedLinear
    sparse: bte.ETPSparseLinear
    readout: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.grouped = bte.ETPGroupedLinear(N_IN, N, G, dtype=F64, key=k[0])
        self.sparse = bte.ETPSparseLinear(N_IN, N, INDICES, dtype=F64, key=k[1])
        self.readout = eqx.nn.Linear(N, 2, dtype=F64, key=k[2])

    def __call__(self, x, hidden):
        i, v = _lif(*hidden, self.grouped(x) + self.sparse(x))
        return (i, v), self.readout(jnp.tanh(v))


@pytest.mark.slow  # about 2 s each; NNX's twin runs by default
def test_equinox_layers_train_exactly_and_match_the_core_ops():
    net = EqxLIF(jax.random.PRNGKey(0))
    carry, xs, targets = _data((B,))
    w = net.grouped.weight
    assert w.shape == (G, N // G, N_IN // G)  # Equinox's (out, in) order per block
    want = ops.grouped_dense(xs[0, 0], jnp.swapaxes(w, 1, 2), net.grouped.bias)
    np.testing.assert_allclose(net.grouped(xs[0, 0]), want, rtol=1e-13)
    learner = bte.compile(net, mse, bt.D_RTRL())
    _, grads, _ = learner.scan(net, learner.init(net, carry, xs[0]), xs, targets)
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def swapped(p, h, x):  # the oracle's step is (params, hidden, x) -> (hidden, out)
        new_h, out = jax.vmap(eqx.combine(p, static))(x, h)
        return new_h, out

    _assert_equal_trees(grads, _bptt(swapped, params, carry, xs, targets, True))


# -- errors and docs ------------------------------------------------------------------------------


def test_errors_name_the_layer():
    bad = [[0, 0], [N_IN, 1]]
    with pytest.raises(
        ValueError, match=r"ETPSparseDense.*indices\[1\] = \(4, 1\) is out of range"
    ):
        btf.ETPSparseDense(N, bad).init(jax.random.key(0), jnp.ones((1, N_IN)))
    with pytest.raises(ValueError, match=r"ETPSparseLinear\(4, 6\): indices\[1\]"):
        btnnx.ETPSparseLinear(N_IN, N, bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ETPSparseLinear\(4, 6\): indices\[1\]"):
        bte.ETPSparseLinear(N_IN, N, bad, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"ETPGroupedDense.*inputs' last axis \(5\)"):
        btf.ETPGroupedDense(N, groups=G).init(jax.random.key(0), jnp.ones((1, 5)))
    with pytest.raises(ValueError, match=r"ETPGroupedLinear\(4, 5, groups=2\)"):
        btnnx.ETPGroupedLinear(N_IN, 5, G, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ETPGroupedLinear\(5, 6, groups=2\)"):
        bte.ETPGroupedLinear(5, N, G, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "name",
    [
        "braintrace_flax.grouped_sparse",
        "braintrace_flax.nnx.grouped_sparse",
        "braintrace_eqx.grouped_sparse",
    ],
)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
