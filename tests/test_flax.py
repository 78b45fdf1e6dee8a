"""braintrace_flax against independent oracles: nn.Dense itself, closed forms, and BPTT
by jax.grad through lax.scan over module.apply (float64, see conftest.py)."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat, leaves, mse
from jax import lax

import braintrace as bt
import braintrace_flax as btf
from braintrace.testing.reference import cosine, one_step_grad
from braintrace_flax.layers import autoname_like
from oracles import rel_err

F64 = jnp.float64
B, T, N_IN, N = 3, 6, 3, 4


def assert_trees_identical(a, b):
    """Same structure (boxes and their metadata included), dtypes and values."""
    sa = jax.tree_util.tree_structure(a, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    sb = jax.tree_util.tree_structure(b, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    assert sa == sb
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(leaves(a), leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def bptt_grad(step, params, hidden, xs, targets, batched=True):
    """The oracle: jax.grad of the summed loss through lax.scan over the step."""

    def total(p):
        def body(h, inputs):
            x, target = inputs
            h, out = step(p, h, x)
            loss = jax.vmap(mse)(out, target).mean() if batched else mse(out, target)
            return h, loss

        return lax.scan(body, hidden, (xs, targets))[1].sum()

    return jax.grad(total)(params)


def run_learner(learner, params, hidden, xs, targets):
    state = learner.init(params, hidden, xs[0])
    return jax.jit(learner.scan)(params, state, xs, targets)


def max_rel_err(grads, reference):
    return max(rel_err(g, r) for g, r in zip(leaves(grads), leaves(reference)))


class Readout(nn.Module):
    """A cell followed by a plain (stock, unconverted unless asked) nn.Dense readout."""

    cell: nn.Module
    n_out: int = 2

    @nn.compact
    def __call__(self, carry, x):
        carry, y = self.cell(carry, x)
        return carry, nn.Dense(self.n_out, param_dtype=F64, name="readout")(y)


def _data(seed, t=T, lead=(B,), n_in=N_IN, n_out=2):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return (
        jax.random.normal(k1, (t,) + lead + (n_in,), F64),
        jax.random.normal(k2, (t,) + lead + (n_out,), F64),
    )


# -- ETPDense: a drop-in for nn.Dense ---------------------------------------------------------


def test_etpdense_has_nn_dense_fields_in_order_with_defaults():
    ours = [(f.name, f.default) for f in dataclasses.fields(btf.ETPDense)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(nn.Dense)]
    assert ours == theirs
    assert ours[0][0] == "features" and btf.ETPDense(3).features == 3  # positional


DENSE_CONFIGS = {
    "default": {},
    "no_bias": {"use_bias": False},
    "custom_inits": {
        "kernel_init": nn.initializers.normal(0.7),
        "bias_init": nn.initializers.uniform(0.3),
    },
    "param_f64": {"param_dtype": F64},
    "param_bf16_compute_f32": {"param_dtype": jnp.bfloat16, "dtype": jnp.float32},
    "boxed": {
        "kernel_init": nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")),
        "bias_init": nn.with_partitioning(nn.initializers.zeros_init(), ("model",)),
    },
}


@pytest.mark.parametrize("shape", [(N_IN,), (2, N_IN), (2, 5, N_IN)])
@pytest.mark.parametrize("config", sorted(DENSE_CONFIGS))
def test_etpdense_init_and_apply_equal_nn_dense(config, shape):
    kwargs = DENSE_CONFIGS[config]
    ours, stock = btf.ETPDense(5, **kwargs), nn.Dense(5, **kwargs)
    x = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    v_ours = ours.init(jax.random.key(0), x)
    v_stock = stock.init(jax.random.key(0), x)
    assert_trees_identical(v_ours, v_stock)
    if config == "boxed":
        assert isinstance(v_ours["params"]["kernel"], nn.Partitioned)
        assert v_ours["params"]["kernel"].names == (None, "model")
    y = ours.apply(v_ours, x)
    y_ref = stock.apply(v_stock, x)
    assert y.shape == shape[:-1] + (5,) and y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref, np.float64))
    # A checkpoint of one loads into the other.
    np.testing.assert_array_equal(
        np.asarray(ours.apply(v_stock, x), np.float64),
        np.asarray(stock.apply(v_ours, x), np.float64),
    )


def test_etpdense_f64_any_leading_axes_match_closed_form():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 1, 3, N_IN), F64)
    v = btf.ETPDense(4, param_dtype=F64).init(jax.random.key(0), x)
    y = btf.ETPDense(4, param_dtype=F64).apply(v, x)
    p = v["params"]
    closed = np.einsum("...i,ik->...k", np.asarray(x), np.asarray(p["kernel"])) + np.asarray(
        p["bias"]
    )
    np.testing.assert_allclose(np.asarray(y), closed, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "x_dtype, kwargs",
    [
        (jnp.float64, {}),  # params f32, input f64: promotes to f64 like nn.Dense
        (jnp.float64, {"dtype": jnp.float32, "param_dtype": F64}),
        (jnp.int32, {}),  # integer input promotes to a float
        (
            jnp.float32,
            {
                "promote_dtype": lambda *a, dtype=None: [
                    None if v is None else jnp.asarray(v, jnp.float64) for v in a
                ]
            },
        ),
    ],
)
def test_etpdense_dtype_semantics_match_nn_dense(x_dtype, kwargs):
    x = jnp.arange(2 * N_IN).reshape(2, N_IN).astype(x_dtype)
    v = nn.Dense(4, **kwargs).init(jax.random.key(0), x)
    y_ref = nn.Dense(4, **kwargs).apply(v, x)
    y = btf.ETPDense(4, **kwargs).apply(v, x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(y_ref, np.float64))


def test_etpdense_passes_precision_to_the_op():
    x = jnp.ones((2, N_IN), jnp.float32)
    layer = btf.ETPDense(4, precision=lax.Precision.HIGHEST)
    v = layer.init(jax.random.key(0), x)
    eqn = jax.make_jaxpr(lambda v: layer.apply(v, x))(v).eqns[-1]
    assert eqn.primitive.name == "etp_mm"
    assert eqn.params["precision"] == lax.Precision.HIGHEST


def test_etpdense_kernel_reaches_the_op_raw_when_computing_in_another_dtype():
    """dtype= casts inside the op, so the compiler still sees the raw kernel (a trace)."""

    class Leaky(nn.Module):
        @nn.compact
        def __call__(self, h, x):
            y = btf.ETPDense(N, dtype=jnp.float32, param_dtype=F64)(x)
            h = 0.9 * h + y.astype(F64)
            return h, h

    model = Leaky()
    h, x = jnp.zeros((B, N)), jnp.ones((B, N_IN))
    params = model.init(jax.random.key(0), h, x)["params"]
    report = btf.compile(model, mse, bt.D_RTRL()).report(params, h, x)
    assert report.param("['Dense_0']['kernel']").mode == "trace"
    assert report.param("['Dense_0']['bias']").mode == "trace"


def test_boxed_params_go_through_the_learner_and_optax():
    class Leaky(nn.Module):
        @nn.compact
        def __call__(self, h, x):
            kernel_init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            h = 0.5 * h + btf.ETPDense(N, kernel_init=kernel_init, param_dtype=F64)(x)
            return h, h

    model = Leaky()
    h, x = jnp.zeros((B, N), F64), jnp.ones((B, N_IN), F64)
    params = model.init(jax.random.key(0), h, x)["params"]
    learner = btf.compile(model, mse, bt.D_RTRL())
    assert learner.report(params, h, x).param("['Dense_0']['kernel'].value").mode == "trace"
    state = learner.init(params, h, x)
    _, grads, _ = jax.jit(learner.step)(params, state, x, jnp.ones((B, N), F64))
    assert isinstance(grads["Dense_0"]["kernel"], nn.Partitioned)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))
    assert isinstance(optax.apply_updates(params, updates)["Dense_0"]["kernel"], nn.Partitioned)


def test_etpdense_errors_name_the_layer():
    x = jnp.ones((2, N_IN))
    with pytest.raises(ValueError, match=r"ETPDense at .*dot_general.*Leave dot_general=None"):
        btf.ETPDense(4, dot_general=lax.dot_general).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="dot_general_cls"):
        btf.ETPDense(4, dot_general_cls=object).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="at least one axis"):
        btf.ETPDense(4).init(jax.random.key(0), jnp.ones(()))
    bad = lambda *a, dtype=None: (
        [None if v is None else jnp.asarray(v, jnp.float16) for v in a[:1]] + list(a[1:])
    )
    with pytest.raises(ValueError, match="mixed dtypes"):
        btf.ETPDense(4, promote_dtype=bad).init(jax.random.key(0), x)


def test_etpdense_autonames_like_dense_so_model_checkpoints_swap():
    def mlp(dense):
        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return dense(2)(jnp.tanh(nn.Dense(3)(jnp.tanh(dense(3)(x)))))

        return MLP()

    x = jnp.ones((2, N_IN))
    v_ours = mlp(btf.ETPDense).init(jax.random.key(0), x)
    v_stock = mlp(nn.Dense).init(jax.random.key(0), x)
    assert sorted(v_ours["params"]) == ["Dense_0", "Dense_1", "Dense_2"]
    assert_trees_identical(v_ours, v_stock)
    np.testing.assert_allclose(
        mlp(btf.ETPDense).apply(v_stock, x), mlp(nn.Dense).apply(v_stock, x), rtol=1e-6
    )


def test_tabulate_works_on_a_model_with_the_layers():
    model = Readout(btf.ETPLIFCell(N, param_dtype=F64))
    carry = model.cell.initialize_carry(jax.random.key(0), (B, N_IN))
    table = nn.tabulate(model, jax.random.key(1))(carry, jnp.ones((B, N_IN)))
    for name in ("ETPLIFCell", "ETPDense", "ETPElemwise", "decay", "linear", "readout"):
        assert name in table, name


# -- ETPElemwise and ETPLoRA --------------------------------------------------------------


def test_etpelemwise_returns_fn_of_weight_and_its_gradient():
    layer = btf.ETPElemwise(N, nn.initializers.constant(0.3), jax.nn.sigmoid, F64)
    v = layer.init(jax.random.key(0))
    assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {"weight": (N,)}}
    w = jnp.linspace(-1.0, 1.0, N, dtype=F64)
    out = layer.apply({"params": {"weight": w}})
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-np.asarray(w))), rtol=1e-14)
    jaxpr = jax.make_jaxpr(lambda w: layer.apply({"params": {"weight": w}}))(w)
    assert [e.primitive.name for e in jaxpr.eqns] == ["etp_elemwise"]
    g = jax.grad(lambda w: (layer.apply({"params": {"weight": w}}) * jnp.arange(N)).sum())(w)
    s = 1 / (1 + np.exp(-np.asarray(w)))
    np.testing.assert_allclose(g, s * (1 - s) * np.arange(N), rtol=1e-12)
    grid = btf.ETPElemwise((2, 3), nn.initializers.ones)
    assert grid.apply(grid.init(jax.random.key(0))).shape == (2, 3)
    with pytest.raises(ValueError, match="ETPElemwise at .*elementwise"):
        btf.ETPElemwise(N, nn.initializers.ones, jnp.sum).init(jax.random.key(0))


def test_etplora_params_frozen_base_and_closed_form():
    base_init = nn.initializers.normal(1.0)
    layer = btf.ETPLoRA(
        N, 2, scale=0.5, base_kernel=base_init, param_dtype=F64, b_init=nn.initializers.normal(1.0)
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, N_IN), F64)
    v = layer.init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, v) == {
        "params": {"lora_a": (N_IN, 2), "lora_b": (2, N), "bias": (N,)},
        btf.FROZEN: {"base_kernel": (N_IN, N)},
    }
    p, w0 = v["params"], v[btf.FROZEN]["base_kernel"]
    closed = x @ w0 + 0.5 * (x @ p["lora_a"]) @ p["lora_b"] + p["bias"]
    np.testing.assert_allclose(layer.apply(v, x), closed, rtol=1e-12, atol=1e-12)
    # The NNX defaults: lora_b starts at zero, so the adapter starts as the base alone.
    v0 = btf.ETPLoRA(N, 2, base_kernel=base_init, param_dtype=F64).init(jax.random.key(0), x)
    assert float(jnp.abs(v0["params"]["lora_b"]).max()) == 0.0
    # An array base is a constant of the module; no 'frozen' collection then.
    const = btf.ETPLoRA(N, 2, scale=0.5, base_kernel=w0, param_dtype=F64)
    assert sorted(const.init(jax.random.key(0), x)) == ["params"]
    np.testing.assert_allclose(const.apply({"params": p}, x), closed, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="frozen base kernel is missing.*constants="):
        layer.apply({"params": p}, x)
    with pytest.raises(ValueError, match=r"base_kernel must have shape \(in, features\)"):
        btf.ETPLoRA(N, 2, base_kernel=jnp.ones((2, 2))).init(jax.random.key(0), x)
    with pytest.raises(TypeError, match="ETPLoRA at .*param_dtype=float64"):
        btf.ETPLoRA(N, 2).init(jax.random.key(0), x)  # f64 input, f32 params


# -- the exact class through Flax ---------------------------------------------------------


class LoRALIF(nn.Module):
    """A 2-state LIF driven by an ETPLoRA over a frozen base kernel."""

    @nn.compact
    def __call__(self, carry, x):
        i, v = carry
        alpha = btf.ETPElemwise(
            N, nn.initializers.constant(3.0), btf.ExpDecay(1.0), F64, name="tau"
        )()
        drive = btf.ETPLoRA(
            N,
            2,
            scale=0.7,
            base_kernel=nn.initializers.normal(1.0),
            b_init=nn.initializers.normal(0.5),
            param_dtype=F64,
        )(x)
        i = 0.8 * i + drive
        v = alpha * (v - 0.5 * btf.spike(v - 0.5)) + (1 - alpha) * i
        return (i, v), nn.Dense(2, param_dtype=F64)(jnp.tanh(v) + btf.spike(v - 0.5))


def _lif_case(batched):
    lead = (B,) if batched else ()
    model = Readout(btf.ETPLIFCell(N, mem_decay=0.7, threshold=0.5, param_dtype=F64))
    k = jax.random.split(jax.random.PRNGKey(4), 2)
    carry = (jax.random.normal(k[0], lead + (N,), F64), jax.random.normal(k[1], lead + (N,), F64))
    xs, targets = _data(5, lead=lead)
    xs = 2.0 * xs
    params = model.init(jax.random.key(0), carry, xs[0])["params"]
    return model, params, carry, xs, targets


@pytest.mark.parametrize("batched", [True, False])
def test_lif_drtrl_equals_bptt_through_flax(batched):
    model, params, carry, xs, targets = _lif_case(batched)
    learner = btf.compile(model, mse, bt.D_RTRL(), batched=batched)
    report = learner.report(params, carry, xs[0])
    for path in (
        "['cell']['linear']['kernel']",
        "['cell']['linear']['bias']",
        "['cell']['decay']['weight']",
    ):
        assert report.param(path).mode == "trace", path
    assert report.groups[0].num_states == 2
    (losses, _), grads, state = run_learner(learner, params, carry, xs, targets)
    reference = bptt_grad(btf.make_step(model), params, carry, xs, targets, batched)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert max_rel_err(grads, reference) <= 1e-10
    assert losses.shape == (T,) and bool(jnp.all(state.count == T))
    # Negative control: without the traces (one-step gradient) the check fails.
    truncated = one_step_grad(btf.make_step(model), mse, params, carry, xs, targets, batched)
    assert (
        rel_err(truncated["cell"]["linear"]["kernel"], reference["cell"]["linear"]["kernel"]) > 1e-3
    )
    assert (
        rel_err(truncated["cell"]["decay"]["weight"], reference["cell"]["decay"]["weight"]) > 1e-3
    )


def test_lora_lif_drtrl_equals_bptt_with_a_frozen_base():
    model = LoRALIF()
    carry = (jnp.zeros((B, N), F64), jnp.full((B, N), 0.3, F64))
    xs, targets = _data(6)
    variables = model.init(jax.random.key(1), carry, xs[0])
    params = variables["params"]
    assert btf.FROZEN in variables
    learner = btf.compile(model, mse, bt.D_RTRL(), constants=variables)
    report = learner.report(params, carry, xs[0])
    for name in ("lora_a", "lora_b", "bias"):
        assert report.param(f"['ETPLoRA_0']['{name}']").mode == "trace"
    _, grads, _ = run_learner(learner, params, carry, xs, targets)
    step = btf.make_step(model, constants=variables)
    reference = bptt_grad(step, params, carry, xs, targets)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert max_rel_err(grads, reference) <= 1e-10
    # optax sees params only: the base kernel is out of the optimizer by construction.
    opt = optax.sgd(0.1)
    updates, _ = opt.update(grads, opt.init(params))
    assert "base_kernel" not in str(jax.tree_util.tree_structure(updates))


# -- stock cells with convert_dense=True ----------------------------------------------------

# Cosine of the cell's gradient (readout left out: it is exact for every algorithm) to
# BPTT in _stock_case's configuration (n_in=4, n=8, T=20, B=4, seed 0). Measured:
#   GRU  d_rtrl 0.9841, pp_prop(0.9) 0.8688, one-step (no traces) 0.8365
#   LSTM d_rtrl 0.9967, pp_prop(0.9) 0.9427, one-step (no traces) 0.9197
# Floors sit below the measurements.
CONVERT_FLOORS = {
    ("GRUCell", "d_rtrl"): 0.97,
    ("GRUCell", "pp_prop"): 0.84,
    ("LSTMCell", "d_rtrl"): 0.98,
    ("LSTMCell", "pp_prop"): 0.90,
}
GATE_KERNELS = {
    "GRUCell": ("ir", "iz", "in", "hr", "hz", "hn"),
    "LSTMCell": ("ii", "if", "ig", "io", "hi", "hf", "hg", "ho"),
}


def _stock_case(cell_cls, seed=0, n_in=4, n=8, t=20, b=4):
    cell = cell_cls(n, param_dtype=F64)
    model = Readout(cell)
    xs, targets = _data(seed, t=t, lead=(b,), n_in=n_in)
    carry = cell.initialize_carry(jax.random.key(2), (b, n_in))
    params = model.init(jax.random.key(3), carry, xs[0])["params"]
    return model, params, carry, xs, targets


@pytest.mark.slow
@pytest.mark.parametrize("cell_cls", [nn.GRUCell, nn.LSTMCell], ids=lambda c: c.__name__)
def test_convert_dense_stock_cells_train_by_traces_close_to_bptt(cell_cls):
    name = cell_cls.__name__
    model, params, carry, xs, targets = _stock_case(cell_cls)
    reference = bptt_grad(btf.make_step(model), params, carry, xs, targets)
    truncated = one_step_grad(btf.make_step(model), mse, params, carry, xs, targets, True)
    c_truncated = cosine(flat(truncated["cell"]), flat(reference["cell"]))
    for algo in (bt.D_RTRL(), bt.pp_prop(0.9)):
        learner = btf.compile(model, mse, algo, convert_dense=True)
        report = learner.report(params, carry, xs[0])
        for gate in GATE_KERNELS[name]:
            assert report.param(f"['cell']['{gate}']['kernel']").mode == "trace", gate
        _, grads, _ = run_learner(learner, params, carry, xs, targets)
        assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
        assert rel_err(grads["readout"]["kernel"], reference["readout"]["kernel"]) <= 1e-10
        c = cosine(flat(grads["cell"]), flat(reference["cell"]))
        assert c >= CONVERT_FLOORS[(name, algo.name)], (name, algo.name, c)
        if algo.name == "d_rtrl":  # the traces carry credit the one-step gradient lacks
            assert c > c_truncated + 0.05, (name, c, c_truncated)
    # Negative controls: without convert_dense nothing is traced (plain dot_general), and
    # a random gradient is far from BPTT.
    plain = btf.compile(model, mse, bt.D_RTRL()).report(params, carry, xs[0])
    assert all(p.mode != "trace" for p in plain.params)
    noise = jax.random.normal(jax.random.PRNGKey(0), flat(reference["cell"]).shape, F64)
    assert cosine(noise, flat(reference["cell"])) < 0.5


@pytest.mark.parametrize("cell_cls", [nn.SimpleCell, nn.MGUCell], ids=lambda c: c.__name__)
def test_convert_dense_simple_and_mgu_cells_are_traced(cell_cls):
    model, params, carry, xs, targets = _stock_case(cell_cls, t=3)
    learner = btf.compile(model, mse, bt.D_RTRL(), convert_dense=True)
    report = learner.report(params, carry, xs[0])
    cell_entries = [p for p in report.params if p.path.startswith("['cell']")]
    assert cell_entries and all(p.mode == "trace" for p in cell_entries)
    _, grads, _ = run_learner(learner, params, carry, xs, targets)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert float(jnp.abs(flat(grads["cell"])).max()) > 0


def test_optimized_lstm_cell_is_rerouted_to_the_etp_lstm():
    """nn.OptimizedLSTMCell has no Dense calls; convert_dense runs ETPLSTMCell's equations
    on its (identical) params: the same ETP ops and the same outputs as the stock cell."""
    model, params, carry, xs, _ = _stock_case(nn.LSTMCell, t=1)
    fused = Readout(nn.OptimizedLSTMCell(8, param_dtype=F64))
    with btf.etp_dense_calls():  # same params as nn.LSTMCell's, inside the context too
        assert_trees_identical(fused.init(jax.random.key(3), carry, xs[0])["params"], params)
    report = btf.compile(fused, mse, bt.D_RTRL(), convert_dense=True).report(params, carry, xs[0])
    for gate in GATE_KERNELS["LSTMCell"]:
        assert report.param(f"['cell']['{gate}']['kernel']").mode == "trace", gate
    ours = btf.make_step(fused, convert_dense=True)
    expected = btf.make_step(model, convert_dense=True)
    eqns = lambda step: [e.primitive.name for e in jax.make_jaxpr(step)(params, carry, xs[0]).eqns]
    assert eqns(ours) == eqns(expected)
    for a, b in zip(
        leaves(ours(params, carry, xs[0])), leaves(fused.apply({"params": params}, carry, xs[0]))
    ):  # the stock fused forward pass
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "pair",
    [(btf.ETPGRUCell, nn.GRUCell), (btf.ETPLSTMCell, nn.LSTMCell)],
    ids=lambda p: p[0].__name__,
)
def test_etp_cells_equal_stock_cells(pair):
    ours, stock = pair[0](N, param_dtype=F64), pair[1](N, param_dtype=F64)
    x = jax.random.normal(jax.random.PRNGKey(0), (B, N_IN), F64)
    carry = jax.tree_util.tree_map(
        lambda a: a + 0.3, stock.initialize_carry(jax.random.key(1), x.shape)
    )
    v = stock.init(jax.random.key(2), carry, x)
    assert_trees_identical(ours.init(jax.random.key(2), carry, x), v)
    for a, b in zip(leaves(ours.apply(v, carry, x)), leaves(stock.apply(v, carry, x))):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    jaxpr = jax.make_jaxpr(lambda v: ours.apply(v, carry, x))(v)
    assert sum(e.primitive.name == "etp_mm" for e in jaxpr.eqns) == len(
        GATE_KERNELS[pair[1].__name__]
    )
    # Inside a compact parent it takes the stock auto-name (checkpoints swap).

    class Parent(nn.Module):
        @nn.compact
        def __call__(self, carry, x):
            return pair[0](N, param_dtype=F64)(carry, x)

    assert sorted(Parent().init(jax.random.key(2), carry, x)["params"]) == [pair[1].__name__ + "_0"]


# -- an optax loop --------------------------------------------------------------------------


@pytest.mark.parametrize("algo", [bt.D_RTRL(), bt.pp_prop(0.8)], ids=lambda a: a.name)
def test_optax_loop_lowers_the_loss(algo):
    """Delayed recall (target_t = x_{t-2}) with a stock GRU made online; 30 adam steps.

    Measured mean loss, first -> last step: d_rtrl 0.974 -> 0.409, pp_prop(0.8) 0.974 ->
    0.493 (BPTT reaches 0.257).
    """
    b, t, n = 16, 12, 8
    model = Readout(nn.GRUCell(n, param_dtype=F64), n_out=1)
    xs = jax.random.normal(jax.random.PRNGKey(0), (t, b, 1), F64)
    targets = jnp.concatenate([jnp.zeros((2, b, 1), F64), xs[:-2]])
    carry = jnp.zeros((b, n), F64)
    params = model.init(jax.random.key(0), carry, xs[0])["params"]
    learner = btf.compile(model, mse, algo, convert_dense=True)
    opt = optax.adam(0.03)

    @jax.jit
    def update(params, opt_state):
        state = learner.init(params, carry, xs[0])
        (losses, _), grads, _ = learner.scan(params, state, xs, targets)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.mean()

    opt_state = opt.init(params)
    history = []
    for _ in range(30):
        params, opt_state, loss = update(params, opt_state)
        history.append(float(loss))
    assert history[-1] < 0.6 * history[0], history


# -- whole-sequence modules: nn.RNN ---------------------------------------------------------


def _rnn_case(time_major, cell=None, t=T):
    cell = (
        cell
        if cell is not None
        else btf.ETPLIFCell(N, mem_decay=0.7, threshold=0.5, param_dtype=F64)
    )
    rnn = nn.RNN(cell, time_major=time_major)
    xs, targets = _data(8, t=t, lead=(B,), n_out=N)
    xs = 2.0 * xs
    if not time_major:  # the RNN's own layout: (batch, time, features)
        xs, targets = xs.transpose(1, 0, 2), targets.transpose(1, 0, 2)
    carry = cell.initialize_carry(jax.random.key(1), (B, N_IN))
    carry = jax.tree_util.tree_map(lambda a: a + 0.3, carry)
    params = rnn.init(jax.random.key(2), xs, initial_carry=carry)["params"]
    return rnn, params, carry, xs, targets


def _rnn_loss_grad(rnn, params, carry, xs, targets):
    """The oracle: jax.grad of the summed per-step batch-mean loss of the RNN's own forward."""
    t_axis = 0 if rnn.time_major else 1

    def total(p):
        outs = rnn.apply({"params": p}, xs, initial_carry=carry)
        per_step = jax.vmap(jax.vmap(mse), in_axes=t_axis)(outs, targets)  # (T, B)
        return per_step.mean(axis=1).sum()

    return jax.grad(total)(params)


@pytest.mark.parametrize(
    "time_major",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # nn.RNN's default layout is fast
    ids=["batch_major", "time_major"],
)
def test_rnn_scan_uses_the_rnn_layout_and_trains_its_cell_exactly(time_major):
    rnn, params, carry, xs, targets = _rnn_case(time_major)
    assert sorted(params) == ["cell"]
    learner = btf.compile(rnn, mse, bt.D_RTRL())
    x0 = xs[0] if time_major else xs[:, 0]
    report = learner.report(params, carry, x0)
    assert report.param("['cell']['linear']['kernel']").mode == "trace"
    state = learner.init(params, carry, x0)
    (losses, outs), grads, state = jax.jit(learner.scan)(params, state, xs, targets)
    assert losses.shape == (T,)
    # Outputs in the RNN's own layout, equal to the RNN's own forward pass.
    expected = rnn.apply({"params": params}, xs, initial_carry=carry)
    assert outs.shape == expected.shape == xs.shape[:-1] + (N,)
    np.testing.assert_allclose(outs, expected, rtol=1e-12, atol=1e-12)
    # An exact-class cell: D-RTRL equals jax.grad through the RNN's forward pass.
    reference = _rnn_loss_grad(rnn, params, carry, xs, targets)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert max_rel_err(grads, reference) <= 1e-10
    # window() speaks the same layout: one window over the whole sequence is BPTT.
    (w_losses, w_outs), w_grads, _ = jax.jit(learner.window)(
        params, learner.init(params, carry, x0), xs, targets
    )
    np.testing.assert_allclose(w_outs, expected, rtol=1e-12, atol=1e-12)
    assert max_rel_err(w_grads, reference) <= 1e-10


def test_rnn_of_a_stock_cell_with_convert_dense_matches_its_forward_pass():
    rnn, params, carry, xs, targets = _rnn_case(False, cell=nn.GRUCell(N, param_dtype=F64))
    learner = btf.compile(rnn, mse, bt.BPTT(), convert_dense=True)
    state = learner.init(params, carry, xs[:, 0])
    (_, outs), grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    expected = rnn.apply({"params": params}, xs, initial_carry=carry)
    np.testing.assert_allclose(outs, expected, rtol=1e-12, atol=1e-12)
    reference = _rnn_loss_grad(rnn, params, carry, xs, targets)
    assert max_rel_err(grads, reference) <= 1e-10


def test_rnn_options_an_online_learner_cannot_follow_are_refused():
    with pytest.raises(ValueError, match="reverse=True.*runs forwards"):
        btf.compile(nn.RNN(nn.GRUCell(N), reverse=True), mse, bt.D_RTRL())


def test_autoname_reads_linen_internals_in_one_place_and_says_when_flax_changes():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return btf.ETPDense(2)(x)

    x = jnp.ones((2, N_IN))
    assert sorted(MLP().init(jax.random.key(0), x)["params"]) == ["Dense_0"]
    # A Flax whose module state has no auto-name cursor: a clear error, not a silent rename.
    parent = nn.Dense(3)
    object.__setattr__(parent, "_state", types.SimpleNamespace(in_setup=False))
    layer = types.SimpleNamespace(name=None, parent=parent)
    with pytest.raises(RuntimeError, match="no longer has linen's auto-name cursor.*name="):
        autoname_like(layer, "Dense")


def test_learner_forwards_strict_window_and_reset():
    model, params, carry, xs, targets = _lif_case(True)
    learner = btf.compile(model, mse, bt.D_RTRL(), strict=True)  # exact class: no error
    state = learner.init(params, carry, xs[0])
    (_, _), g1, s1 = learner.scan(params, state, xs, targets, window=3)
    reference = bptt_grad(btf.make_step(model), params, carry, xs, targets)
    assert max_rel_err(g1, reference) <= 1e-10
    fresh = learner.reset(s1)
    assert bool(jnp.all(fresh.count == 0))
    np.testing.assert_array_equal(fresh.hidden[0], jnp.zeros_like(carry[0]))

    class Untraced(nn.Module):  # a stock Dense drives the state: truncated, so strict raises
        @nn.compact
        def __call__(self, h, x):
            h = 0.5 * h + nn.Dense(N, param_dtype=F64)(x)
            return h, h

    h = jnp.zeros((B, N), F64)
    p = Untraced().init(jax.random.key(0), h, xs[0])["params"]
    with pytest.raises(bt.CompileError, match="strict=True"):
        btf.compile(Untraced(), mse, bt.D_RTRL(), strict=True).init(p, h, xs[0])


# -- the learner glue: errors and documentation ------------------------------------------


def test_compile_errors_are_clear():
    cell = nn.GRUCell(N)
    with pytest.raises(TypeError, match="module instance"):
        btf.compile(nn.GRUCell, mse, bt.D_RTRL())
    with pytest.raises(TypeError, match="flax.linen.Module"):
        btf.compile(lambda p, h, x: (h, h), mse, bt.D_RTRL())
    h, x = jnp.zeros((B, N)), jnp.ones((B, N_IN))
    bound = cell.bind(cell.init(jax.random.key(0), h, x))
    with pytest.raises(ValueError, match="unbound module"):
        btf.compile(bound, mse, bt.D_RTRL())
    with pytest.raises(TypeError, match="constants must be a mapping"):
        btf.compile(cell, mse, bt.D_RTRL(), constants=[1])

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, h, x):
            h = 0.5 * h + nn.Dense(N, dot_general=lax.dot_general, name="w")(x)
            return h, h

    params = Custom().init(jax.random.key(0), h, x)["params"]
    learner = btf.compile(Custom(), mse, bt.D_RTRL(), convert_dense=True)
    with pytest.raises(ValueError, match="Dense at 'w'.*dot_general"):
        learner.report(params, h, x)


def test_method_argument_selects_the_step():
    class TwoWays(nn.Module):
        def setup(self):
            self.w = btf.ETPDense(N)

        def __call__(self, h, x):
            h = 0.5 * h + self.w(x)
            return h, h

        def doubled(self, h, x):
            h, y = self(h, x)
            return h, 2.0 * y

    model = TwoWays()
    h, x = jnp.zeros((B, N), F64), jnp.ones((B, N_IN), F64)
    params = model.init(jax.random.key(0), h, x)["params"]
    step = btf.make_step(model, method="doubled")
    np.testing.assert_allclose(step(params, h, x)[1], 2 * btf.make_step(model)(params, h, x)[1])
    assert sorted(params) == ["w"]
    report = btf.compile(model, mse, bt.D_RTRL(), method="doubled").report(params, h, x)
    assert report.param("['w']['kernel']").mode == "trace"


@pytest.mark.parametrize("name", ["__init__", "layers", "cells", "convert", "learner"])
def test_docstring_examples_run(name):
    module = importlib.import_module("braintrace_flax" + ("" if name == "__init__" else f".{name}"))
    result = doctest.testmod(module, verbose=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_core_does_not_import_flax_and_the_adapter_not_equinox():
    code = (
        "import sys, braintrace; assert 'flax' not in sys.modules; "
        "import braintrace_flax; assert 'equinox' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
