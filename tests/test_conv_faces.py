"""The convolution twins in every face: linen ``ETPConv``, NNX ``ETPConv``, Equinox
``ETPConv``/``ETPConv1d``/``ETPConv2d``, and a stock ``nn.ConvLSTMCell`` converted.

- bit identity: the same variables after ``init`` (same key) and the same outputs as
  the stock layer, over strides, paddings (``CIRCULAR``/``REFLECT`` too), dilation and
  groups; ``convert`` / ``convert_dense`` / ``from_eqx`` keep the tree;
- unsupported options raise an error naming the layer;
- one D-RTRL check per face (slow): a conv driving a leaky membrane (exact class),
  D-RTRL's summed gradient through the face equals BPTT's (1e-10, float64);
- ``nn.ConvLSTMCell`` with ``convert_dense=True``: every conv kernel is traced, no
  ``TruncationWarning``, and D-RTRL's gradient is close to BPTT's (recurrent conv:
  approximate class).
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
from helpers import flat, leaves, mse

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace.testing.reference import cosine
from braintrace_flax import nnx as btnnx
from oracles import rel_err

F64 = jnp.float64
T, B = 4, 2
CONFIGS = [
    dict(padding="CIRCULAR", kernel_dilation=2, strides=(1, 2), feature_group_count=2),
    dict(strides=2),
    dict(padding=((1, 0), (2, 1)), feature_group_count=2, use_bias=False),
    dict(padding="REFLECT", strides=(1, 2)),
]
#: The first configuration runs in the default suite, the others with ``-m slow``.
CONFIG_PARAMS = [
    pytest.param(kw, id=str(i), marks=() if i == 0 else pytest.mark.slow)
    for i, kw in enumerate(CONFIGS)
]
#: All with ``-m slow`` (the default suite's budget goes to the core and linen/NNX checks).
EQX_CONFIGS = [
    pytest.param(
        dict(stride=(1, 2), padding=1, padding_mode="CIRCULAR", dilation=2, groups=2),
        id="0",
        marks=pytest.mark.slow,
    ),
    pytest.param(dict(stride=2, padding="SAME"), id="1", marks=pytest.mark.slow),
    pytest.param(
        dict(padding=((1, 0), (2, 1)), groups=2, use_bias=False), id="2", marks=pytest.mark.slow
    ),
]


def _x(shape, dtype=jnp.float32, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _identical(a, b):
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(
        p.shape == q.shape and p.dtype == q.dtype and bool((p == q).all()) for p, q in zip(la, lb)
    )


# -- bit identity ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw", CONFIG_PARAMS)
def test_linen_etpconv_equals_nn_conv_bit_for_bit(kw):
    x = _x((2, 7, 6, 4))
    ours, stock = btf.ETPConv(6, (3, 3), **kw), nn.Conv(6, (3, 3), **kw)
    # One jit per check keeps the compile count low; both layers run in it.
    v, v_ref = jax.jit(lambda k: (ours.init(k, x), stock.init(k, x)))(jax.random.key(0))
    assert _identical(v, v_ref)
    both = jax.jit(lambda v, x: (ours.apply(v, x), stock.apply(v, x)))
    assert _identical(*both(v, x))
    if kw is not CONFIGS[0]:  # (one more compile: with -m slow)
        assert _identical(*both(v, x[0]))  # no batch axis


@pytest.mark.slow
def test_linen_etpconv_1d_causal_several_batch_axes():
    x1 = _x((2, 3, 9, 2))
    ours, stock = btf.ETPConv(3, 3, padding="CAUSAL"), nn.Conv(3, 3, padding="CAUSAL")
    v = stock.init(jax.random.key(0), x1)
    assert _identical(ours.init(jax.random.key(0), x1), v)
    assert _identical(ours.apply(v, x1), stock.apply(v, x1))


def test_linen_convert_reroutes_stock_conv_and_autonames():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(3, (3, 3), strides=2)(nn.Conv(4, (2, 2))(x))

    class Twin(nn.Module):
        @nn.compact
        def __call__(self, x):
            return btf.ETPConv(3, (3, 3), strides=2)(btf.ETPConv(4, (2, 2))(x))

    # Traced only (no compile): the outputs are ETPConv's, checked bit for bit above.
    x = jax.ShapeDtypeStruct((2, 6, 6, 2), jnp.float32)
    v = jax.eval_shape(Net().init, jax.random.key(0), x)
    twin = jax.eval_shape(Twin().init, jax.random.key(0), x)  # Conv_0, Conv_1 names
    assert jax.tree_util.tree_structure(twin) == jax.tree_util.tree_structure(v)
    assert jax.tree.leaves(twin) == jax.tree.leaves(v)
    with btf.etp_dense_calls():
        jaxpr = jax.make_jaxpr(lambda v, x: Net().apply(v, x))(v, x)
    names = [e.primitive.name for e in jaxpr.eqns]
    assert names.count("etp_conv_batched") == 2 and "conv_general_dilated" not in names
    plain = [e.primitive.name for e in jax.make_jaxpr(lambda v, x: Net().apply(v, x))(v, x).eqns]
    assert "etp_conv_batched" not in plain  # negative control: outside the context


@pytest.mark.parametrize("kw", CONFIG_PARAMS)
def test_nnx_etpconv_equals_nnx_conv(kw):
    x = _x((2, 7, 6, 4))
    ours = btnnx.ETPConv(4, 6, (3, 3), **kw, rngs=nnx.Rngs(0))
    stock = nnx.Conv(4, 6, (3, 3), **kw, rngs=nnx.Rngs(0))
    assert _identical(nnx.state(ours), nnx.state(stock))
    both = nnx.jit(lambda a, b, x: (a(x), b(x)))
    assert _identical(*both(ours, stock, x))
    if kw is not CONFIGS[0]:  # (one more compile: with -m slow)
        assert _identical(*both(ours, stock, x[0]))  # no batch axis


@pytest.mark.slow
def test_nnx_convert_swaps_conv_in_place():
    x = jnp.zeros((2, 7, 6, 4), jnp.float32)
    model = nnx.Sequential(nnx.Conv(4, 6, 3, rngs=nnx.Rngs(0)), nnx.Conv(6, 2, 1, rngs=nnx.Rngs(1)))
    before = nnx.state(model)
    btnnx.convert(model)
    assert all(type(layer) is btnnx.ETPConv for layer in model.layers)
    assert nnx.state(model) == before
    names = [e.primitive.name for e in jax.make_jaxpr(lambda x: model(x))(x).eqns]
    assert names.count("etp_conv_batched") == 2 and "conv_general_dilated" not in names


@pytest.mark.parametrize("kw", EQX_CONFIGS)
def test_eqx_conv2d_twin_keeps_fields_init_and_output(kw):
    key = jax.random.PRNGKey(0)
    x = _x((4, 7, 6), F64)
    ours, stock = bte.ETPConv2d(4, 6, 3, **kw, key=key), eqx.nn.Conv2d(4, 6, 3, **kw, key=key)
    assert _identical(ours, stock)
    both = eqx.filter_jit(lambda a, b, x: (a(x), b(x), jax.vmap(a)(x[None]), jax.vmap(b)(x[None])))
    y, y_ref, mapped, mapped_ref = both(ours, stock, x)
    assert _identical(y, y_ref) and _identical(mapped, mapped_ref)


@pytest.mark.slow
def test_eqx_from_eqx_and_to_eqx_keep_the_tree():
    key = jax.random.PRNGKey(0)
    model = {"a": eqx.nn.Conv1d(2, 3, 3, key=key), "b": [eqx.nn.Conv(3, 1, 2, 2, key=key)]}
    converted = bte.from_eqx(model)
    assert type(converted["a"]) is bte.ETPConv1d and type(converted["b"][0]) is bte.ETPConv
    assert _identical(converted, model)
    back = bte.to_eqx(converted)
    assert type(back["a"]) is eqx.nn.Conv1d and type(back["b"][0]) is eqx.nn.Conv
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(model)


@pytest.mark.slow
def test_unsupported_options_name_the_layer():
    x, key = jax.ShapeDtypeStruct((1, 6, 6, 2), jnp.float32), jax.random.key(0)
    with pytest.raises(ValueError, match=r"ETPConv at .*input_dilation"):
        jax.eval_shape(btf.ETPConv(3, (3, 3), input_dilation=2).init, key, x)
    with pytest.raises(ValueError, match=r"ETPConv at .*mask"):
        jax.eval_shape(btf.ETPConv(3, (2, 2), mask=jnp.ones((2, 2, 2, 3))).init, key, x)
    layer = btf.ETPConv(3, (3, 3))
    v = jax.eval_shape(layer.init, key, x)
    with pytest.raises(Exception, match=r"kernel"):  # Flax's own shape check, on the param
        jax.eval_shape(layer.apply, v, jax.ShapeDtypeStruct((1, 6, 6, 3), jnp.float32))
    x = jnp.ones((1, 6, 6, 2))
    with pytest.raises(ValueError, match=r"ETPConv\(2, 3, \(3, 3\)\): .*mask"):
        btnnx.ETPConv(2, 3, (3, 3), mask=jnp.ones((3, 3, 2, 3)), rngs=nnx.Rngs(0))(x)
    conv = bte.ETPConv2d(2, 3, 3, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"braintrace_eqx\.ETPConv2d: .*input-channel axis"):
        conv(jnp.ones((3, 6, 6)))


# -- one D-RTRL check per face (exact class) -------------------------------------------------


class LinenLeaky(nn.Module):
    @nn.compact
    def __call__(self, v, x):
        v = 0.8 * v + btf.ETPConv(3, (3, 3), strides=2, param_dtype=F64)(x)
        ro = self.param("ro", nn.initializers.normal(0.3), (27, 2), F64)
        return v, jnp.tanh(v.reshape(v.shape[0], -1)) @ ro


class NNXLeaky(nnx.Module):
    def __init__(self, rngs):
        self.conv = btnnx.ETPConv(2, 3, (3, 3), strides=2, param_dtype=F64, rngs=rngs)
        self.ro = nnx.Param(jax.random.normal(jax.random.PRNGKey(5), (27, 2), F64) * 0.3)

    def __call__(self, v, x):
        v = 0.8 * v + self.conv(x)
        return v, jnp.tanh(v.reshape(v.shape[0], -1)) @ self.ro[...]


class EqxLeaky(eqx.Module):
    conv: bte.ETPConv2d
    ro: jax.Array

    def __init__(self, key):
        self.conv = bte.ETPConv2d(2, 3, 3, stride=2, padding="SAME", key=key)
        self.ro = jax.random.normal(jax.random.PRNGKey(5), (27, 2), F64) * 0.3

    def __call__(self, x, v):
        v = 0.8 * v + self.conv(x)
        return v, jnp.tanh(v.reshape(-1)) @ self.ro


def _grads(face, algorithm):
    xs, targets = _x((T, B, 6, 6, 2), F64, 2) * 2.0, _x((T, B, 2), F64, 3)
    v0 = _x((B, 3, 3, 3), F64, 4)
    if face == "linen":
        model = LinenLeaky()
        params = model.init(jax.random.key(0), v0, xs[0])["params"]
        learner = btf.compile(model, mse, algorithm)
        state = learner.init(params, v0, xs[0])
        return jax.jit(learner.scan)(params, state, xs, targets)[1]
    if face == "nnx":
        model = NNXLeaky(nnx.Rngs(0))
        learner = btnnx.compile(model, mse, algorithm)
        state = learner.init(model, v0, xs[0])
        return nnx.jit(learner.scan)(model, state, xs, targets)[1]
    model = EqxLeaky(jax.random.PRNGKey(0))
    xs, v0 = jnp.moveaxis(xs, -1, 2), jnp.moveaxis(v0, -1, 1)  # channels first
    learner = bte.compile(model, mse, algorithm)
    state = learner.init(model, v0, xs[0])
    return eqx.filter_jit(learner.scan)(model, state, xs, targets)[1]


@pytest.mark.slow
@pytest.mark.parametrize("face", ["linen", "nnx", "eqx"])
def test_face_d_rtrl_equals_bptt(face):
    got, want = leaves(_grads(face, bt.D_RTRL())), leaves(_grads(face, bt.BPTT()))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-10
    # Negative control: the one-step gradient of the kernel is off.
    one_step = leaves(_grads(face, bt.OneStep()))
    assert max(rel_err(g, w) for g, w in zip(one_step, want)) > 1e-3


# -- a stock ConvLSTM cell, converted ---------------------------------------------------------


def _convlstm(t=T):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, carry, x):
            carry, h = nn.ConvLSTMCell(3, (3, 3), param_dtype=F64)(carry, x)
            ro = self.param("ro", nn.initializers.normal(0.3), (5 * 5 * 3, 2), F64)
            return carry, jnp.tanh(h.reshape(h.shape[0], -1)) @ ro

    xs, targets = _x((t, B, 5, 5, 2), F64, 6), _x((t, B, 2), F64, 7)
    carry = nn.ConvLSTMCell(3, (3, 3), param_dtype=F64).initialize_carry(
        jax.random.key(1), xs[0].shape
    )
    params = Net().init(jax.random.key(2), carry, xs[0])["params"]
    return Net(), params, carry, xs, targets


@pytest.mark.slow
def test_convlstm_convert_dense_traces_every_kernel_and_d_rtrl_is_close_to_bptt():
    """Every conv kernel is traced (no TruncationWarning: the suite makes it an error)."""
    model, params, carry, xs, targets = _convlstm(t=8)
    report = btf.compile(model, mse, bt.D_RTRL(), convert_dense=True).report(params, carry, xs[0])
    cell = [p for p in report.params if "ConvLSTMCell" in p.path]
    assert len(cell) == 4 and all(p.mode == "trace" for p in cell), report
    assert {p.gradient for p in cell} == {"approximate"}  # the hidden-to-hidden conv recurs
    grads = {}
    for name, algo in {"d_rtrl": bt.D_RTRL(), "bptt": bt.BPTT(), "one": bt.OneStep()}.items():
        learner = btf.compile(model, mse, algo, convert_dense=True)
        state = learner.init(params, carry, xs[0])
        grads[name] = jax.jit(learner.scan)(params, state, xs, targets)[1]
    cell = {k: flat(g["ConvLSTMCell_0"]) for k, g in grads.items()}
    assert (
        np.isfinite(np.asarray(cell["d_rtrl"])).all() and float(jnp.abs(cell["d_rtrl"]).max()) > 0
    )
    c, c_one = cosine(cell["d_rtrl"], cell["bptt"]), cosine(cell["one"], cell["bptt"])
    # Measured: D-RTRL 0.988, one-step (no traces) 0.822; floors below them.
    assert c > 0.97 and c > c_one + 0.1, (c, c_one)
    assert rel_err(grads["d_rtrl"]["ro"], grads["bptt"]["ro"]) <= 1e-10


@pytest.mark.slow  # ~12 s of eager convolutions
@pytest.mark.parametrize(
    "name", ["braintrace_flax.conv", "braintrace_flax.nnx.conv", "braintrace_eqx.conv"]
)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
