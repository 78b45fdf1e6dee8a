"""RTRL against BPTT (``jax.grad`` through ``lax.scan``, float64): every leaf, every model.

RTRL keeps the full influence ``dh/dtheta``, so its summed gradient must equal BPTT's
for models D-RTRL only approximates (recurrent weights, a stack behind an input
layer, a parameter used by an ETP op and by plain ``jnp``), per step and in windows,
through the core and the linen, NNX and Equinox faces. The report must say
``exact`` for every leaf, and a learner over ``max_bytes`` must be refused.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import leaves, run_example

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
import braintrace_flax.nnx as btnnx
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

T, B = 6, 3
F64 = jnp.float64
_slow = pytest.mark.slow

MODELS = {
    "rnn": (M.rnn_step, M.rnn_params, None),
    "gru": (M.gru_step, M.gru_params, None),
    "rlif": (M.rlif_step, M.rlif_params, ("i", "v")),
    "stack": (M.lif_stack_step, M.lif_stack_params, {"l1": ("i", "v"), "l2": ("i", "v")}),
    "mixed": (M.mixed_lif_step, M.lif_params, ("i", "v")),
}


def _hidden(names, lead, seed=1):
    if names is None:
        return 0.5 * jax.random.normal(jax.random.PRNGKey(seed), lead + (M.N,), F64)
    if isinstance(names, dict):
        return {k: M.hidden_like(v, lead, seed=seed + i) for i, (k, v) in enumerate(names.items())}
    return M.hidden_like(names, lead, seed=seed)


def _problem(model, batched=True, t=T):
    step, make_params, names = MODELS[model]
    lead = (B,) if batched else ()
    k1, k2 = jax.random.split(jax.random.PRNGKey(7))
    xs = jax.random.normal(k1, (t,) + lead + (M.N_IN,), F64)
    targets = jax.random.normal(k2, (t,) + lead + (2,), F64)
    return step, make_params(), _hidden(names, lead), xs, targets


def _assert_equal_trees(got, ref, tol=1e-10):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    for g, r in zip(leaves(got), leaves(ref)):
        assert rel_err(g, r) <= tol


@pytest.mark.parametrize(
    "model, batched, window",
    [
        ("stack", True, 4),
        ("mixed", True, None),
        pytest.param("rnn", True, None, marks=_slow),
        pytest.param("rnn", True, 4, marks=_slow),
        pytest.param("rnn", False, None, marks=_slow),
        pytest.param("stack", False, 4, marks=_slow),
        pytest.param("stack", True, None, marks=_slow),
        pytest.param("mixed", True, 4, marks=_slow),
        *(pytest.param(m, True, k, marks=_slow) for m in ("gru", "rlif") for k in (None, 4)),
    ],
)
def test_rtrl_equals_bptt_per_step_and_in_windows(model, batched, window):
    """``window=None``: per step; ``4``: windows of 4 steps (the last one of 2)."""
    step, params, hidden, xs, targets = _problem(model, batched)
    learner = bt.compile(step, M.mse, bt.RTRL(), batched=batched)
    state = learner.init(params, hidden, xs[0])
    run = jax.jit(lambda p, s, x, y: learner.scan(p, s, x, y, window=window))
    _, grads, final = run(params, state, xs, targets)
    _assert_equal_trees(grads, bptt_grad(step, M.mse, params, hidden, xs, targets, batched))
    assert int(jnp.ravel(final.count)[0]) == T


def test_rtrl_report_marks_every_leaf_exact_and_gives_its_memory():
    step, params, hidden, xs, _ = _problem("stack")
    report = bt.compile(step, M.mse, bt.RTRL()).report(params, hidden, xs[0])
    assert all(p.gradient == "exact" for p in report.params)
    win = report.param("['win']")
    assert win.mode == "trace" and "RTRL" in win.reason
    assert report.param("['ro']").mode == "one-step"  # a readout: no influence kept
    h_size = 4 * M.N  # two layers of (i, v)
    influenced = sum(a.size for k, a in params.items() if k != "ro")
    assert dict(report.trace_memory) == {"rtrl": h_size * influenced * 8}
    assert "trace memory per sample: rtrl" in str(report) and "!!" not in str(report)
    # D-RTRL on the same model is not exact everywhere (negative control).
    d_rtrl = bt.compile(step, M.mse, bt.D_RTRL()).report(params, hidden, xs[0])
    assert {p.gradient for p in d_rtrl.params} >= {"truncated", "approximate"}


def test_rtrl_refuses_an_influence_matrix_over_max_bytes():
    step, params, hidden, xs, _ = _problem("gru")
    small = bt.compile(step, M.mse, bt.RTRL(max_bytes=5_000))
    with pytest.raises(
        bt.CompileError,
        match=r"RTRL: the influence matrix would take .*bytes.*"
        r"max_bytes=5000. Use bt.D_RTRL\(\) or bt.SnAp1\(\)",
    ):
        small.init(params, hidden, xs[0])
    # The report still says how big it would be.
    ((name, size),) = small.report(params, hidden, xs[0]).trace_memory
    assert name == "rtrl" and size * B > 5_000
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        bt.RTRL(max_bytes=0)


def test_rtrl_step_keeps_at_most_one_influence_sized_temporary():
    """The multiply by the step Jacobian materialises one ``H x P`` array beside the state."""
    params = M.gru_params(0, n_in=4, n=16, dtype=jnp.float32)
    f32 = jnp.float32
    hidden, x, y = jnp.zeros((4, 16), f32), jnp.zeros((4, 4), f32), jnp.zeros((4, 2), f32)
    learner = bt.compile(M.gru_step, M.mse, bt.RTRL())
    state = learner.init(params, hidden, x)
    traces = sum(a.nbytes for a in leaves(state.traces))
    temp = jax.jit(learner.step).lower(params, state, x, y).compile().memory_analysis()
    # Measured: 0.64x the influence matrix (GRU, n=16, B=4).
    assert temp.temp_size_in_bytes <= 1.25 * traces, (temp.temp_size_in_bytes, traces)


# -- the faces ---------------------------------------------------------------------------------


def _face_data(n_in, lead=(B,), n_out=2):
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return (
        jax.random.normal(k1, (T,) + lead + (n_in,), F64),
        jax.random.normal(k2, (T,) + lead + (n_out,), F64),
    )


WINDOWS = [pytest.param(None, marks=_slow), pytest.param(4, marks=_slow)]


@pytest.mark.parametrize("window", WINDOWS)
def test_rtrl_equals_bptt_through_linen(window):
    cell = nn.GRUCell(M.N, param_dtype=F64)
    xs, targets = _face_data(M.N_IN, n_out=M.N)
    carry = jnp.full((B, M.N), 0.2, F64)
    params = cell.init(jax.random.PRNGKey(0), carry, xs[0])["params"]
    reference = bptt_grad(btf.make_step(cell), M.mse, params, carry, xs, targets, True)
    learner = btf.compile(cell, M.mse, bt.RTRL(), convert_dense=True)
    state = learner.init(params, carry, xs[0])
    run = jax.jit(lambda p, s, x, y: learner.scan(p, s, x, y, window=window))
    _assert_equal_trees(run(params, state, xs, targets)[1], reference)


class _Readout(nnx.Module):
    def __init__(self, cell, n, rngs):
        self.cell = cell
        self.readout = nnx.Linear(n, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        carry, y = self.cell(carry, x)
        return carry, self.readout(y)


@pytest.mark.parametrize("window", [4, pytest.param(None, marks=_slow)])
def test_rtrl_equals_bptt_through_nnx_with_fused_gates(window):
    model = _Readout(nnx.GRUCell(M.N_IN, M.N, param_dtype=F64, rngs=nnx.Rngs(0)), M.N, nnx.Rngs(1))
    graphdef, values, rest = nnx.split(model, nnx.Param, ...)
    treedef = jax.tree_util.tree_structure(values)

    def stock_step(p, carry, x):  # the stock model, no ETP op: the oracle's step
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves(p)), rest)
        return m(carry, x)

    xs, targets = _face_data(M.N_IN)
    carry = jnp.full((B, M.N), 0.2, F64)
    reference = bptt_grad(stock_step, M.mse, nnx.as_pure(values), carry, xs, targets, True)
    btnnx.convert(model)
    learner = btnnx.compile(model, M.mse, bt.RTRL())
    state = learner.init(model, carry, xs[0])
    run = nnx.jit(lambda m, s, x, y: learner.scan(m, s, x, y, window=window))
    _, grads, _ = run(model, state, xs, targets)
    _assert_equal_trees(nnx.as_pure(grads), nnx.as_pure(reference))


class _EqxNet(eqx.Module):
    cell: eqx.Module
    readout: eqx.nn.Linear

    def __call__(self, x, hidden):
        hidden = self.cell(x, hidden)
        return hidden, self.readout(hidden)


@pytest.mark.parametrize("window", [None, pytest.param(4, marks=_slow)])
def test_rtrl_equals_bptt_through_equinox(window):
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    stock = _EqxNet(eqx.nn.GRUCell(M.N_IN, M.N, key=k[0]), eqx.nn.Linear(M.N, 2, key=k[1]))
    stock = jax.tree_util.tree_map(lambda a: a.astype(F64) if eqx.is_inexact_array(a) else a, stock)
    params, static = eqx.partition(stock, eqx.is_inexact_array)

    def stock_step(p, hidden, x):
        return jax.vmap(eqx.combine(p, static))(x, hidden)

    xs, targets = _face_data(M.N_IN)
    hidden = jnp.full((B, M.N), 0.2, F64)
    reference = bptt_grad(stock_step, M.mse, params, hidden, xs, targets, True)
    model = bte.from_eqx(stock)
    learner = bte.compile(model, M.mse, bt.RTRL())
    state = learner.init(model, hidden, xs[0])
    run = eqx.filter_jit(lambda m, s, x, y: learner.scan(m, s, x, y, window=window))
    _, grads, _ = run(model, state, xs, targets)
    for g, r in zip(leaves(grads), leaves(reference)):
        assert rel_err(g, r) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rtrl", "snap1", "uoro"])
def test_whole_step_algorithms_run_data_parallel(algorithm):
    """On 2 CPU devices (a subprocess): both routes equal one device (float32 rounding),
    and no per-sample state (influence, factors, keys) moves between devices."""
    summary = run_example(
        "data_parallel",
        "--cpu-devices", "2", "--algorithm", algorithm, "--episodes", "1", "--steps", "10",
    )  # fmt: skip
    assert summary["devices"] == 2 and summary["max_abs_diff"] <= 1e-5, summary
    for route in ("shard_map", "jit"):
        moves = summary["collectives"][route]
        assert moves["all-gather"] == moves["collective-permute"] == moves["all-to-all"] == 0
