"""braintrace_flax.nnx against independent oracles: NNX's own layers, closed forms, and BPTT
by jax.grad through lax.scan (float64, see conftest.py).

Also the "one face, three frameworks" checks: the LIF neuron is the same in linen, NNX
and Equinox, and ``batched`` has one default in every ``compile``.
"""

from __future__ import annotations

import doctest
import importlib
import inspect

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import flat, leaves, load_example, mse, run_example
from jax import lax

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace.testing.reference import bptt_grad, cosine, one_step_grad
from braintrace_flax import nnx as btnnx
from oracles import rel_err

F64 = jnp.float64
B, T, N_IN, N = 3, 6, 3, 4


def pure(tree):
    """An ``nnx.State`` of variables (or grads) as plain arrays, keyed like the model."""
    return nnx.as_pure(tree)


def max_rel_err(grads, reference):
    return max(rel_err(g, r) for g, r in zip(leaves(grads), leaves(reference), strict=True))


def step_of(model, call=None):
    """The oracles' step ``(params, carry, x) -> (carry, out)`` over plain arrays, by
    split/merge (what a user would write for jax.grad), and the model's params."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    treedef = jax.tree_util.tree_structure(params)

    def step(values, carry, x):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves(values)), rest)
        return (call or type(m).__call__)(m, carry, x)

    return step, pure(params)


def run(learner, model, carry, xs, targets, **kw):
    state = learner.init(model, carry, xs[0])
    return nnx.jit(lambda m, s, x, y: learner.scan(m, s, x, y, **kw))(model, state, xs, targets)


def data(seed, t=T, lead=(B,), n_in=N_IN, n_out=2):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.normal(k1, (t,) + lead + (n_in,), F64),
        jax.random.normal(k2, (t,) + lead + (n_out,), F64),
    )


def assert_states_identical(a, b):
    """Same paths, variable types, metadata, dtypes and values."""
    fa, fb = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
    assert list(fa) == list(fb)
    for path, va in fa.items():
        vb = fb[path]
        assert type(va) is type(vb), path
        assert va.get_metadata() == vb.get_metadata(), path
        x, y = va.get_value(), vb.get_value()
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


# -- ETPLinear: the twin of nnx.Linear ------------------------------------------------------


def test_etp_layers_keep_the_stock_constructors():
    assert btnnx.ETPLinear.__init__ is nnx.Linear.__init__
    assert btnnx.ETPLoRA.__init__ is nnx.LoRA.__init__
    assert issubclass(btnnx.ETPLinear, nnx.Linear) and issubclass(btnnx.ETPLoRA, nnx.LoRA)
    assert list(inspect.signature(btnnx.ETPElemwise.__init__).parameters) == [
        "self",
        "shape",
        "weight_init",
        "fn",
        "rngs",
        "param_dtype",
    ]


LINEAR_CONFIGS = {
    "default": {},
    "no_bias": {"use_bias": False},
    "custom_inits": {
        "kernel_init": nnx.initializers.normal(0.7),
        "bias_init": nnx.initializers.uniform(0.3),
    },
    "param_f64": {"param_dtype": F64},
    "param_bf16_compute_f32": {"param_dtype": jnp.bfloat16, "dtype": jnp.float32},
    "precision": {"precision": lax.Precision.HIGHEST},
    "metadata": {"kernel_metadata": {"description": "input weights"}},
}


@pytest.mark.parametrize("shape", [(N_IN,), (2, N_IN), (2, 5, N_IN)])
@pytest.mark.parametrize("config", sorted(LINEAR_CONFIGS))
def test_etplinear_equals_nnx_linear(config, shape):
    kwargs = LINEAR_CONFIGS[config]
    ours = btnnx.ETPLinear(N_IN, 5, rngs=nnx.Rngs(0), **kwargs)
    stock = nnx.Linear(N_IN, 5, rngs=nnx.Rngs(0), **kwargs)
    assert_states_identical(nnx.state(ours), nnx.state(stock))  # same Params, same values
    x = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    y, y_ref = ours(x), stock(x)
    assert y.shape == shape[:-1] + (5,) and y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref, np.float64))
    # The kernel reaches the op as the raw parameter (a trace can train it).
    graphdef, params = nnx.split(ours)
    jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(x))(params)
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name in ("etp_mv", "etp_mm")]
    kernel_var = jaxpr.jaxpr.invars[len(leaves(params)) - 1]  # leaves sorted: bias, kernel
    assert eqn.invars[1] is kernel_var
    assert eqn.params["precision"] == kwargs.get("precision")


@pytest.mark.parametrize(
    "x_dtype, kwargs",
    [
        (jnp.float64, {}),  # params f32, input f64: promotes to f64 like nnx.Linear
        (jnp.float64, {"dtype": jnp.float32, "param_dtype": F64}),
        (jnp.int32, {}),  # integer input promotes to a float
        (
            jnp.float32,
            {
                "promote_dtype": lambda a, dtype=None: tuple(
                    None if v is None else jnp.asarray(v, jnp.float64) for v in a
                )
            },
        ),
    ],
)
def test_etplinear_dtype_semantics_match_nnx_linear(x_dtype, kwargs):
    x = jnp.arange(2 * N_IN).reshape(2, N_IN).astype(x_dtype)
    y = btnnx.ETPLinear(N_IN, 4, rngs=nnx.Rngs(0), **kwargs)(x)
    y_ref = nnx.Linear(N_IN, 4, rngs=nnx.Rngs(0), **kwargs)(x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref, np.float64))


def test_etplinear_errors_name_the_layer_and_the_fix():
    x = jnp.ones((2, N_IN))
    with pytest.raises(ValueError, match=r"ETPLinear\(3, 4\): dot_general .*keep nnx.Linear"):
        btnnx.ETPLinear(N_IN, 4, dot_general=lambda *a, **k: 0, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="preferred_element_type"):
        btnnx.ETPLinear(N_IN, 4, preferred_element_type=F64, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="out_sharding"):
        btnnx.ETPLinear(N_IN, 4, rngs=nnx.Rngs(0))(x, out_sharding=object())
    with pytest.raises(ValueError, match="at least one axis"):
        btnnx.ETPLinear(N_IN, 4, rngs=nnx.Rngs(0))(jnp.ones(()))
    bad = lambda a, dtype=None: (jnp.asarray(a[0], jnp.float16),) + tuple(a[1:])  # noqa: E731
    with pytest.raises(ValueError, match="mixed dtypes"):
        btnnx.ETPLinear(N_IN, 4, promote_dtype=bad, rngs=nnx.Rngs(0))(x)


# -- ETPLoRA and ETPElemwise ------------------------------------------------------------


@pytest.mark.parametrize("with_base", [False, True], ids=["no_base", "base_module"])
@pytest.mark.parametrize("shape", [(N_IN,), (2, 5, N_IN)])
def test_etplora_equals_nnx_lora(with_base, shape):
    def make(cls):
        base = nnx.Linear(N_IN, N, rngs=nnx.Rngs(7)) if with_base else None
        layer = cls(
            N_IN,
            2,
            N,
            base_module=base,
            b_initializer=nnx.initializers.normal(1.0),
            rngs=nnx.Rngs(0),
        )
        return layer

    ours, stock = make(btnnx.ETPLoRA), make(nnx.LoRA)
    assert_states_identical(nnx.state(ours), nnx.state(stock))
    assert type(ours.lora_a) is nnx.LoRAParam and ours.lora_a.shape == (N_IN, 2)
    assert ours.lora_b.shape == (2, N)
    x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
    y, y_ref = ours(x), stock(x)
    assert y.shape == y_ref.shape == shape[:-1] + (N,) and y.dtype == y_ref.dtype
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    a, b = ours.lora_a.get_value(), ours.lora_b.get_value()
    closed = x @ a @ b + (stock.base_module(x) if with_base else 0.0)
    np.testing.assert_allclose(y, closed, rtol=1e-6, atol=1e-6)
    names = [e.primitive.name for e in jax.make_jaxpr(lambda x: ours(x))(x).eqns]
    assert sum(n.startswith("etp_lora") for n in names) == 1


def test_etpelemwise_returns_fn_of_weight_and_its_gradient():
    layer = btnnx.ETPElemwise(
        N, nnx.initializers.constant(0.3), jax.nn.sigmoid, rngs=nnx.Rngs(0), param_dtype=F64
    )
    state = nnx.state(layer)
    assert list(dict(nnx.to_flat_state(state))) == [("weight",)]
    assert type(layer.weight) is nnx.Param and layer.weight.dtype == F64
    w = jnp.linspace(-1.0, 1.0, N, dtype=F64)
    graphdef, params = nnx.split(layer)

    def apply(w):
        return nnx.merge(graphdef, jax.tree_util.tree_map(lambda _: w, params))()

    s = 1 / (1 + np.exp(-np.asarray(w)))
    np.testing.assert_allclose(apply(w), s, rtol=1e-14)
    assert [e.primitive.name for e in jax.make_jaxpr(apply)(w).eqns] == ["etp_elemwise"]
    g = jax.grad(lambda w: (apply(w) * jnp.arange(N)).sum())(w)
    np.testing.assert_allclose(g, s * (1 - s) * np.arange(N), rtol=1e-12)
    assert btnnx.ETPElemwise((2, 3), nnx.initializers.ones, rngs=nnx.Rngs(0))().shape == (2, 3)
    with pytest.raises(ValueError, match=r"ETPElemwise\(4,\): fn must be elementwise"):
        btnnx.ETPElemwise(N, nnx.initializers.ones, jnp.sum, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="weight_init must be an initializer"):
        btnnx.ETPElemwise(N, 0.5, rngs=nnx.Rngs(0))


# -- convert: stock layers through ETP ops, same Params ---------------------------------------


class Shared(nnx.Module):
    """A user module that calls one nnx.Linear twice (a shared reference) and an nnx.LoRA."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(N, N, param_dtype=F64, rngs=rngs)
        self.again = self.lin
        self.lora = nnx.LoRA(N_IN, 2, N, param_dtype=F64, rngs=rngs)

    def __call__(self, h, x):
        h = jnp.tanh(self.lin(h) + self.again(0.5 * h) + self.lora(x))
        return h, h


STOCK_MODELS = {
    "GRUCell": (lambda r: nnx.GRUCell(N_IN, N, param_dtype=F64, rngs=r), 2),
    "LSTMCell": (lambda r: nnx.LSTMCell(N_IN, N, param_dtype=F64, rngs=r), 8),
    "OptimizedLSTMCell": (lambda r: nnx.OptimizedLSTMCell(N_IN, N, param_dtype=F64, rngs=r), 2),
    "SimpleCell": (lambda r: nnx.SimpleCell(N_IN, N, dtype=F64, param_dtype=F64, rngs=r), 2),
    "user_module": (Shared, 3),
}


@pytest.mark.parametrize("name", sorted(STOCK_MODELS))
def test_convert_keeps_params_state_outputs_and_the_optimizer(name):
    make, n_ops = STOCK_MODELS[name]
    model = make(nnx.Rngs(0))
    before = nnx.state(model)
    variables = [v for _, v in nnx.to_flat_state(before)]
    carry = (
        model.initialize_carry((B, N_IN), nnx.Rngs(1))
        if hasattr(model, "initialize_carry")
        else jnp.zeros((B, N), F64)
    )
    carry = jax.tree_util.tree_map(lambda a: a + 0.3, carry)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, N_IN), F64)
    expected = model(carry, x)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)  # made before convert

    assert btnnx.convert(model) is model
    after = nnx.state(model)
    assert_states_identical(after, before)
    assert all(
        a is b for a, b in zip((v for _, v in nnx.to_flat_state(after)), variables, strict=True)
    )  # the very same Param objects
    for a, b in zip(leaves(model(carry, x)), leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    jaxpr = jax.make_jaxpr(lambda c, x: model(c, x))(carry, x)
    assert sum(e.primitive.name.startswith("etp_") for e in jaxpr.eqns) == n_ops
    grads = nnx.grad(lambda m: jnp.sum(m(carry, x)[1] ** 2))(model)
    old = pure(nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    new = pure(nnx.state(model, nnx.Param))
    for o, g, n in zip(leaves(old), leaves(pure(grads)), leaves(new), strict=True):
        np.testing.assert_allclose(n, o - 0.1 * g, rtol=1e-12, atol=1e-14)


def test_convert_inside_an_rnn_and_refuses_non_modules():
    rnn = btnnx.convert(nnx.RNN(nnx.GRUCell(N_IN, N, rngs=nnx.Rngs(0))))
    assert type(rnn.cell.dense_i) is btnnx.ETPLinear
    with pytest.raises(TypeError, match="must be a flax.nnx.Module"):
        btnnx.convert(nn.GRUCell(N))


@pytest.mark.parametrize(
    "ours, stock",
    [
        (btnnx.ETPGRUCell, nnx.GRUCell),
        (btnnx.ETPLSTMCell, nnx.LSTMCell),
        (btnnx.ETPOptimizedLSTMCell, nnx.OptimizedLSTMCell),
    ],
    ids=lambda c: c.__name__,
)
def test_ready_cells_are_the_stock_cells_converted(ours, stock):
    a = ours(N_IN, N, param_dtype=F64, rngs=nnx.Rngs(0))
    b = stock(N_IN, N, param_dtype=F64, rngs=nnx.Rngs(0))
    assert_states_identical(nnx.state(a), nnx.state(b))
    carry = b.initialize_carry((B, N_IN), nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(0), (B, N_IN), F64)
    for u, v in zip(leaves(a(carry, x)), leaves(b(carry, x)), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-13)
    linears = [n for _, n in nnx.iter_graph(a) if isinstance(n, nnx.Linear)]
    assert linears and all(type(n) is btnnx.ETPLinear for n in linears)


# -- the exact class through NNX --------------------------------------------------------------


class TauLIF(nnx.Module):
    """ETPLinear into a 2-state LIF with an ETPElemwise time constant; nnx.Linear readout."""

    def __init__(self, rngs):
        self.drive = btnnx.ETPLinear(N_IN, N, param_dtype=F64, rngs=rngs)
        self.tau = btnnx.ETPElemwise(
            N, nnx.initializers.constant(3.0), btf.ExpDecay(1.0), rngs=rngs, param_dtype=F64
        )
        self.tau.weight.set_value(jnp.linspace(2.0, 5.0, N, dtype=F64))
        self.readout = nnx.Linear(N, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        i, v = carry
        alpha = self.tau()
        i = 0.8 * i + self.drive(x)
        v = alpha * (v - 0.5 * bt.spike(v - 0.5)) + (1 - alpha) * i
        return (i, v), self.readout(jnp.tanh(v) + bt.spike(v - 0.5))


class ReadyLIF(nnx.Module):
    """The ready ETPLIFCell with an nnx.Linear readout of its spikes and voltage."""

    def __init__(self, rngs):
        self.cell = btnnx.ETPLIFCell(
            N_IN, N, mem_decay=0.7, threshold=0.5, param_dtype=F64, rngs=rngs
        )
        self.cell.decay.weight.set_value(jnp.linspace(-1.0, 1.0, N, dtype=F64))
        self.readout = nnx.Linear(N, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        carry, s = self.cell(carry, x)
        return carry, self.readout(jnp.tanh(carry[0]) + s)


EXACT = {
    "tau_lif": (TauLIF, ("drive", "tau"), ("drive/kernel", "tau/weight")),
    "ready_lif": (ReadyLIF, ("cell",), ("cell/linear/kernel", "cell/decay/weight")),
}


def _pick(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one_sample"])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_class_drtrl_equals_bptt_through_nnx(name, batched):
    make, traced, controls = EXACT[name]
    model = make(nnx.Rngs(0))
    lead = (B,) if batched else ()
    k = jax.random.split(jax.random.PRNGKey(4), 2)
    carry = (jax.random.normal(k[0], lead + (N,), F64), jax.random.normal(k[1], lead + (N,), F64))
    xs, targets = data(5, lead=lead)
    xs = 2.0 * xs
    learner = btnnx.compile(model, mse, bt.D_RTRL(), batched=batched)
    report = learner.report(model, carry, xs[0])
    for p in report.params:
        assert p.mode == ("trace" if p.path.split("']")[0][2:] in traced else "one-step"), p
    (losses, _), grads, state = run(learner, model, carry, xs, targets)
    assert isinstance(grads, nnx.State) and losses.shape == (T,)
    assert all(type(v) is nnx.Param for _, v in nnx.to_flat_state(grads))
    step, params = step_of(model)
    reference = bptt_grad(step, mse, params, carry, xs, targets, batched)
    assert jax.tree_util.tree_structure(pure(grads)) == jax.tree_util.tree_structure(reference)
    assert max_rel_err(pure(grads), reference) <= 1e-10
    # Negative control: without traces (one-step gradient) the check fails.
    truncated = one_step_grad(step, mse, params, carry, xs, targets, batched)
    for path in controls:
        assert rel_err(_pick(truncated, path), _pick(reference, path)) > 1e-3, path
    # The data spikes, so the reset and the surrogate are exercised.
    v = lax.scan(lambda c, x: (step(params, c, x)[0],) * 2, carry, xs)[1][1]
    assert 0 < float((v > 0.5).mean()) < 1


# -- stock cells after convert: approximate class -----------------------------------------------


class Readout(nnx.Module):
    def __init__(self, cell, n, rngs):
        self.cell = cell
        self.readout = nnx.Linear(n, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        carry, y = self.cell(carry, x)
        return carry, self.readout(y)


def _stock_case(cell_cls, n_in=4, n=8, t=20, b=4):
    cell = cell_cls(n_in, n, param_dtype=F64, rngs=nnx.Rngs(3))
    model = Readout(cell, n, nnx.Rngs(4))
    before = nnx.state(model)
    btnnx.convert(model)
    assert_states_identical(nnx.state(model), before)
    xs, targets = data(0, t=t, lead=(b,), n_in=n_in)
    carry = cell.initialize_carry((b, n_in), nnx.Rngs(2))
    step, params = step_of(model)
    reference = bptt_grad(step, mse, params, carry, xs, targets, True)
    truncated = one_step_grad(step, mse, params, carry, xs, targets, True)
    return model, carry, xs, targets, reference, truncated


def _kernel_modes(learner, model, carry, x):
    report = learner.report(model, carry, x)
    return {p.path: p.mode for p in report.params if p.path.startswith("['cell']")}


@pytest.mark.parametrize(
    "cell_cls",
    [nnx.GRUCell, pytest.param(nnx.OptimizedLSTMCell, marks=pytest.mark.slow)],
    ids=lambda c: c.__name__,
)
def test_stock_fused_nnx_cells_after_convert_are_trace_trained_close_to_bptt(cell_cls):
    """nnx.GRUCell / OptimizedLSTMCell fuse their gates in one kernel per input and split
    the ops' outputs: the compiler's index maps follow each gate, so every kernel is
    traced with the model's own parameter tree."""
    model, carry, xs, targets, reference, truncated = _stock_case(cell_cls)
    learner = btnnx.compile(model, mse, bt.D_RTRL(), strict=True)  # nothing truncated
    modes = _kernel_modes(learner, model, carry, xs[0])
    assert len(modes) == 3 and set(modes.values()) == {"trace"}, modes
    _, grads, _ = run(learner, model, carry, xs, targets)
    c = cosine(flat(pure(grads)["cell"]), flat(reference["cell"]))
    c_truncated = cosine(flat(truncated["cell"]), flat(reference["cell"]))
    # Measured (n_in=4, n=8, T=20, B=4): GRU D-RTRL 0.998, one-step 0.880; optimized
    # LSTM 0.995 and 0.889.
    assert c >= 0.9 and c > c_truncated + 0.05, (c, c_truncated)


@pytest.mark.slow
def test_stock_nnx_lstm_after_convert_is_trace_trained_close_to_bptt():
    """nnx.LSTMCell keeps one nnx.Linear per gate: traced without any index map."""
    model, carry, xs, targets, reference, truncated = _stock_case(nnx.LSTMCell)
    learner = btnnx.compile(model, mse, bt.D_RTRL())
    modes = _kernel_modes(learner, model, carry, xs[0])
    assert len(modes) == 12 and set(modes.values()) == {"trace"}, modes
    _, grads, _ = run(learner, model, carry, xs, targets)
    assert rel_err(pure(grads)["readout"]["kernel"], reference["readout"]["kernel"]) <= 1e-10
    c = cosine(flat(pure(grads)["cell"]), flat(reference["cell"]))
    c_truncated = cosine(flat(truncated["cell"]), flat(reference["cell"]))
    # Measured (n_in=4, n=8, T=20, B=4): D-RTRL 0.989, one-step 0.846.
    assert c >= 0.97 and c > c_truncated + 0.05, (c, c_truncated)


def test_stock_nnx_gru_after_convert_learns_with_nnx_optimizer():
    """Delayed recall (target_t = x_{t-2}); 20 adam steps through nnx.Optimizer."""
    b, t, n = 16, 12, 8
    model = btnnx.convert(
        Readout(nnx.GRUCell(1, n, param_dtype=F64, rngs=nnx.Rngs(0)), n, nnx.Rngs(1))
    )
    xs = jax.random.normal(jax.random.PRNGKey(0), (t, b, 1), F64)
    targets = jnp.concatenate([jnp.zeros((2, b, 1), F64), xs[:-2]])
    targets = jnp.concatenate([targets, -targets], axis=-1)
    carry = jnp.zeros((b, n), F64)
    learner = btnnx.compile(model, mse, bt.D_RTRL())
    optimizer = nnx.Optimizer(model, optax.adam(0.03), wrt=nnx.Param)

    @nnx.jit
    def update(model, optimizer):
        state = learner.init(model, carry, xs[0])
        (losses, _), grads, _ = learner.scan(model, state, xs, targets)
        optimizer.update(model, grads)
        return losses.mean()

    history = [float(update(model, optimizer)) for _ in range(20)]
    assert history[-1] < 0.8 * history[0], history
    assert int(optimizer.step.get_value()) == 20


# -- whole-sequence modules: nnx.RNN ----------------------------------------------------------


@pytest.mark.parametrize(
    "time_major",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # nn.RNN's default layout is fast
    ids=["batch_major", "time_major"],
)
def test_nnx_rnn_scan_uses_the_rnn_layout_and_equals_its_forward_pass(time_major):
    cell = btnnx.ETPLIFCell(
        N_IN, N, mem_decay=0.7, threshold=0.5, param_dtype=F64, rngs=nnx.Rngs(0)
    )
    cell.decay.weight.set_value(jnp.linspace(-1.0, 1.0, N, dtype=F64))
    rnn = nnx.RNN(cell, time_major=time_major)
    xs, targets = data(8, lead=(B,), n_out=N)
    xs = 2.0 * xs
    if not time_major:
        xs, targets = xs.transpose(1, 0, 2), targets.transpose(1, 0, 2)
    carry = jax.tree_util.tree_map(lambda a: a + 0.3, cell.initialize_carry((B, N_IN)))
    learner = btnnx.compile(rnn, mse, bt.D_RTRL())
    x0 = xs[0] if time_major else xs[:, 0]
    assert learner.report(rnn, carry, x0).param("['cell']['linear']['kernel']").mode == "trace"
    state = learner.init(rnn, carry, x0)
    (losses, outs), grads, _ = nnx.jit(learner.scan)(rnn, state, xs, targets)
    expected = rnn(xs, initial_carry=carry)
    assert losses.shape == (T,) and outs.shape == expected.shape == xs.shape[:-1] + (N,)
    np.testing.assert_allclose(outs, expected, rtol=1e-12, atol=1e-12)

    def total(model):  # the oracle: jax.grad through the RNN's own forward pass
        per_step = jax.vmap(jax.vmap(mse), in_axes=0 if time_major else 1)(
            model(xs, initial_carry=carry), targets
        )
        return per_step.mean(axis=1).sum()

    reference = nnx.grad(total)(rnn)
    assert max_rel_err(pure(grads), pure(reference)) <= 1e-10
    (_, w_outs), w_grads, _ = learner.window(rnn, learner.init(rnn, carry, x0), xs, targets)
    np.testing.assert_allclose(w_outs, expected, rtol=1e-12, atol=1e-12)
    assert max_rel_err(pure(w_grads), pure(reference)) <= 1e-10
    optimizer = nnx.Optimizer(rnn, optax.sgd(0.1), wrt=nnx.Param)
    optimizer.update(rnn, grads)  # grads fit the RNN's own state


def test_nnx_rnn_reverse_is_refused():
    rnn = nnx.RNN(nnx.GRUCell(N_IN, N, rngs=nnx.Rngs(0)), reverse=True)
    with pytest.raises(ValueError, match="reverse=True.*runs forwards"):
        btnnx.compile(rnn, mse, bt.D_RTRL())


# -- variables outside wrt: constants, a frozen LoRA base, refused updates ----------------------


class LoRALIF(nnx.Module):
    """A 2-state LIF driven by an ETPLoRA over a frozen stock nnx.Linear base."""

    def __init__(self, rngs):
        base = nnx.Linear(N_IN, N, param_dtype=F64, rngs=rngs)
        self.drive = btnnx.ETPLoRA(
            N_IN,
            2,
            N,
            base_module=base,
            param_dtype=F64,
            b_initializer=nnx.initializers.normal(1.0),
            rngs=rngs,
        )
        self.readout = nnx.Linear(N, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        i, v = carry
        i = 0.8 * i + self.drive(x)
        v = 0.6 * v * (1 - bt.spike(v - 0.5)) + 0.4 * i
        return (i, v), self.readout(jnp.tanh(v))


def test_wrt_lora_param_trains_the_adapter_exactly_and_freezes_the_base():
    model = LoRALIF(nnx.Rngs(0))
    carry = (jnp.zeros((B, N), F64), jnp.full((B, N), 0.3, F64))
    xs, targets = data(6)
    learner = btnnx.compile(model, mse, bt.D_RTRL(), wrt=nnx.LoRAParam)
    modes = {p.path: p.mode for p in learner.report(model, carry, xs[0]).params}
    assert modes == {"['drive']['lora_a']": "trace", "['drive']['lora_b']": "trace"}
    _, grads, _ = run(learner, model, carry, xs, targets)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    treedef = jax.tree_util.tree_structure(lora)

    def step(values, carry, x):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves(values)), rest)
        return m(carry, x)

    reference = bptt_grad(step, mse, pure(lora), carry, xs, targets, True)
    assert max_rel_err(pure(grads), reference) <= 1e-10
    base = np.asarray(model.drive.base_module.kernel.get_value())
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    optimizer.update(model, grads)
    np.testing.assert_array_equal(model.drive.base_module.kernel.get_value(), base)


class Counting(nnx.Module):
    def __init__(self, rngs):
        self.lin = btnnx.ETPLinear(N_IN, N, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, h, x):
        self.calls.set_value(self.calls.get_value() + 1)
        h = 0.5 * h + self.lin(x)
        return h, h


class Normed(nnx.Module):
    def __init__(self, rngs):
        self.lin = btnnx.ETPLinear(N_IN, N, param_dtype=F64, rngs=rngs)
        self.norm = nnx.BatchNorm(N, param_dtype=F64, rngs=rngs)

    def __call__(self, h, x):
        h = 0.5 * h + self.norm(self.lin(x))
        return h, h


# nnx.BatchNorm keeps float32 statistics; updating them from float64 data (the refused
# training-mode step) makes JAX warn about the cast.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
def test_variables_changed_during_a_step_are_refused_constants_are_read():
    h, x = jnp.zeros((B, N), F64), jnp.ones((B, N_IN), F64)
    counting = Counting(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"changed calls \(Variable\) during a step"):
        btnnx.compile(counting, mse, bt.D_RTRL()).init(counting, h, x)
    normed = Normed(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"norm/(mean|var) \(BatchStat\).*model.eval\(\)"):
        btnnx.compile(normed, mse, bt.D_RTRL()).init(normed, h, x)
    normed.eval()  # running statistics are read, not updated: constants of the step
    learner = btnnx.compile(normed, mse, bt.D_RTRL())
    assert learner.report(normed, h, x).param("['lin']['kernel']").mode == "trace"
    with pytest.warns(bt.TruncationWarning, match="norm"):  # scale/bias: plain ops, one-step
        state = learner.init(normed, h, x)
    (_, out), grads, _ = learner.step(normed, state, x, jnp.zeros((B, N), F64))
    np.testing.assert_allclose(out, normed(h, x)[1], rtol=1e-12)
    assert sorted(pure(grads)) == ["lin", "norm"]  # the BatchStats are not Params


# -- learner API: forwarding, errors ------------------------------------------------------------


def test_learner_forwards_window_reset_and_strict():
    model = TauLIF(nnx.Rngs(0))
    carry = (jnp.zeros((B, N), F64), jnp.full((B, N), 0.3, F64))
    xs, targets = data(3)
    learner = btnnx.compile(model, mse, bt.D_RTRL(), strict=True)  # exact class: no error
    _, g_window, state = run(learner, model, carry, xs, targets, window=3)
    step, params = step_of(model)
    assert (
        max_rel_err(pure(g_window), bptt_grad(step, mse, params, carry, xs, targets, True)) <= 1e-10
    )
    fresh = learner.reset(state, mask=jnp.array([True, False, True]))
    np.testing.assert_array_equal(fresh.count, [0, T, 0])
    np.testing.assert_array_equal(fresh.hidden[1][1], state.hidden[1][1])
    np.testing.assert_array_equal(fresh.hidden[1][0], jnp.zeros(N))
    stock = Readout(
        nnx.SimpleCell(N_IN, N, dtype=F64, param_dtype=F64, rngs=nnx.Rngs(0)), N, nnx.Rngs(1)
    )  # not converted: plain matmuls drive the state
    with pytest.raises(bt.CompileError, match="strict=True"):
        btnnx.compile(stock, mse, bt.D_RTRL(), strict=True).init(stock, carry[0], xs[0])


def test_compile_errors_are_clear():
    with pytest.raises(TypeError, match="module instance"):
        btnnx.compile(nnx.GRUCell, mse, bt.D_RTRL())
    with pytest.raises(TypeError, match="flax.nnx.Module.*braintrace_flax.compile"):
        btnnx.compile(nn.GRUCell(N), mse, bt.D_RTRL())
    model = TauLIF(nnx.Rngs(0))
    carry = (jnp.zeros((B, N), F64), jnp.zeros((B, N), F64))
    learner = btnnx.compile(model, mse, bt.D_RTRL())
    with pytest.raises(ValueError, match="compile a new learner"):
        learner.init(ReadyLIF(nnx.Rngs(0)), carry, jnp.ones((B, N_IN), F64))

    class NoPair(nnx.Module):
        def __init__(self):
            self.lin = btnnx.ETPLinear(N_IN, N, param_dtype=F64, rngs=nnx.Rngs(0))

        def __call__(self, h, x):
            return self.lin(x)

    bad = NoPair()
    with pytest.raises(TypeError, match=r"must return \(carry, out\)"):
        btnnx.compile(bad, mse, bt.D_RTRL()).init(bad, carry[0], jnp.ones((B, N_IN), F64))


# -- one face, three frameworks -------------------------------------------------------------------


def test_batched_has_one_default_in_every_compile():
    defaults = {
        f: inspect.signature(f).parameters["batched"].default
        for f in (btf.compile, btnnx.compile, bte.compile)
    }
    assert set(defaults.values()) == {True}, defaults


def test_lif_is_the_same_neuron_in_linen_nnx_and_equinox():
    """Same parameters in, same states and spikes out, step after step."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    kernel = 2.0 * jax.random.normal(k[0], (N_IN, N), F64)
    bias = jax.random.normal(k[1], (N,), F64) * 0.3
    logit = jnp.linspace(-1.0, 2.0, N, dtype=F64)
    hyper = dict(mem_decay=0.6, syn_decay=0.7, threshold=0.8, slope=2.0)

    linen = btf.ETPLIFCell(N, param_dtype=F64, **hyper)
    params = {"linear": {"kernel": kernel, "bias": bias}, "decay": {"weight": logit}}
    shapes = jax.tree_util.tree_map(
        jnp.shape,
        linen.init(jax.random.key(0), (jnp.zeros(N), jnp.zeros(N)), jnp.zeros(N_IN))["params"],
    )
    assert shapes == jax.tree_util.tree_map(jnp.shape, params)  # same names and meaning

    cell = btnnx.ETPLIFCell(N_IN, N, param_dtype=F64, rngs=nnx.Rngs(0), **hyper)
    cell.linear.kernel.set_value(kernel)
    cell.linear.bias.set_value(bias)
    cell.decay.weight.set_value(logit)
    nnx_shapes = jax.tree_util.tree_map(jnp.shape, nnx.to_pure_dict(nnx.state(cell, nnx.Param)))
    assert nnx_shapes == shapes
    equinox = bte.ETPLIFCell(N_IN, N, key=k[2], dtype=F64, **hyper)
    equinox = eqx.tree_at(
        lambda c: (c.linear.weight, c.linear.bias, c.decay.weight), equinox, (kernel.T, bias, logit)
    )  # Equinox's (out, in) layout

    xs = 1.5 * jax.random.normal(k[3], (8, N_IN), F64)
    state = {"linen": (jnp.zeros(N), jnp.full(N, 0.2)), "nnx": None, "eqx": None}
    state["nnx"] = state["eqx"] = state["linen"]
    spikes = []
    for x in xs:
        state["linen"], s_linen = linen.apply({"params": params}, state["linen"], x)
        state["nnx"], s_nnx = cell(state["nnx"], x)
        state["eqx"] = equinox(x, state["eqx"])
        s_eqx = equinox.spike(state["eqx"])
        for other in ("nnx", "eqx"):
            for a, b in zip(state[other], state["linen"], strict=True):  # (v, i) each
                np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)
        np.testing.assert_array_equal(s_nnx, s_linen)
        np.testing.assert_array_equal(s_eqx, s_linen)
        spikes.append(s_linen)
    assert 0 < float(jnp.mean(jnp.stack(spikes))) < 1  # the reset path is exercised


# -- the example and the docs -------------------------------------------------------------------


def test_nnx_example_flags_match_the_linen_example():
    ours, linen = load_example("nnx_gru_digits"), load_example("flax_gru_digits")
    args = ours.parse_args(["--quick", "--algorithm", "pp_prop", "--seed", "3"])
    assert args.quick and args.algorithm == "pp_prop" and args.seed == 3
    assert (args.max_batches, args.hidden, args.epochs) == (3, 16, 2)
    assert vars(ours.parse_args([])) == vars(linen.parse_args([]))  # same flags and defaults
    model = btnnx.convert(ours.GRUClassifier(2, 8, rngs=nnx.Rngs(0)))
    assert type(model.gru.dense_h) is btnnx.ETPLinear


@pytest.mark.slow
def test_nnx_example_quick_run_reports_json(tmp_path):
    summary = run_example("nnx_gru_digits", "--quick", "--out", str(tmp_path))
    assert summary["example"] == "nnx_gru_digits" and summary["algorithm"] == "d_rtrl"
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["seconds"] > 0
    assert summary["steps_per_sequence"] == 32 and summary["hidden"] == 16
    assert list(tmp_path.glob("nnx_gru_digits_*.png")), "no plot written"


@pytest.mark.parametrize("name", ["", ".layers", ".convert", ".cells", ".learner"])
def test_docstring_examples_run(name):
    module = importlib.import_module("braintrace_flax.nnx" + name)
    result = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
