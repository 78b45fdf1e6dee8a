"""SnAp-1 against an independent per-sample loop written from its definition.

The oracle (float64, no library code): the step's exact one-step gradient plus the
trace credit ``<dL_t/dh^{t-1}, eps^{t-1}>``, with ``eps^t = diag(J^t) eps^{t-1} + I^t``
kept on the SnAp-1 pattern (a parameter element keeps its influence on the unit it
feeds only), ``J^t`` the full step Jacobian and ``I^t = dh^t/dtheta`` by ``jax.jacfwd``.
On exact-class models (no op reads the state it drives) SnAp-1 must equal D-RTRL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import leaves

import braintrace as bt
import braintrace_flax.nnx as btnnx
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad, cosine
from oracles import rel_err

T, B = 6, 2
F64 = jnp.float64


def snap1_oracle(step, params, h0, xs, targets, unit_of):
    """One sample's summed SnAp-1 gradient; ``unit_of[name]``: the unit of each element."""
    h_size = h0.size
    pattern = {
        k: (jnp.arange(h_size).reshape((-1,) + (1,) * u.ndim) == u) for k, u in unit_of.items()
    }

    @jax.jit
    def one(h, eps, x, target):
        def loss(p, hh):
            return M.mse(step(p, hh, x)[1], target)

        g_p, g_h = jax.grad(loss, argnums=(0, 1))(params, h)
        g_p = {k: g_p[k] + jnp.tensordot(g_h, eps[k], axes=1) if k in eps else g_p[k] for k in g_p}
        diag = jnp.diag(jax.jacfwd(lambda hh: step(params, hh, x)[0])(h))
        immediate = jax.jacfwd(lambda p: step(p, h, x)[0])(params)
        eps = {
            k: (diag.reshape((-1,) + (1,) * (e.ndim - 1)) * e + immediate[k]) * pattern[k]
            for k, e in eps.items()
        }
        return step(params, h, x)[0], eps, g_p

    eps = {k: jnp.zeros((h_size,) + params[k].shape, F64) for k in unit_of}
    total = jax.tree_util.tree_map(jnp.zeros_like, params)
    h = h0
    for t in range(xs.shape[0]):
        h, eps, g = one(h, eps, xs[t], targets[t])
        total = jax.tree_util.tree_map(jnp.add, total, g)
    return total


def _rnn_case():
    params = M.rnn_params(seed=0)
    params["wh"] = params["wh"] + 0.8 * jnp.eye(M.N)  # strong self-recurrence
    k = jax.random.split(jax.random.PRNGKey(4), 3)
    h0 = 0.5 * jax.random.normal(k[0], (B, M.N), F64)
    xs = jax.random.normal(k[1], (T, B, M.N_IN), F64)
    targets = jax.random.normal(k[2], (T, B, 2), F64)
    cols = jnp.arange(M.N)
    unit_of = {
        "wx": jnp.broadcast_to(cols, (M.N_IN, M.N)),
        "wh": jnp.broadcast_to(cols, (M.N, M.N)),
        "b": cols,
    }
    return params, h0, xs, targets, unit_of


def _batch_oracle(step, params, h0, xs, targets, unit_of):
    """The batch mean of the per-sample oracle (the learner's loss is the batch mean)."""
    per = [snap1_oracle(step, params, h0[b], xs[:, b], targets[:, b], unit_of) for b in range(B)]
    return jax.tree_util.tree_map(lambda *g: sum(g) / B, *per)


@pytest.mark.parametrize("batched", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_snap1_equals_its_definition_on_a_tanh_rnn(batched):
    params, h0, xs, targets, unit_of = _rnn_case()
    if batched:
        reference = _batch_oracle(M.rnn_step, params, h0, xs, targets, unit_of)
    else:
        h0, xs, targets = h0[0], xs[:, 0], targets[:, 0]
        reference = snap1_oracle(M.rnn_step, params, h0, xs, targets, unit_of)
    learner = bt.compile(M.rnn_step, M.mse, bt.SnAp1(), batched=batched)
    _, grads, _ = jax.jit(learner.scan)(params, learner.init(params, h0, xs[0]), xs, targets)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name
    # Negative control: D-RTRL drops the recurrent diagonal, so it differs here.
    d_rtrl = bt.compile(M.rnn_step, M.mse, bt.D_RTRL(), batched=batched)
    _, dgrads, _ = jax.jit(d_rtrl.scan)(params, d_rtrl.init(params, h0, xs[0]), xs, targets)
    assert rel_err(dgrads["wh"], reference["wh"]) > 1e-3
    # The recurrent diagonal matters with strong self-recurrence: closer to BPTT.
    exact = bptt_grad(M.rnn_step, M.mse, params, h0, xs, targets, batched)
    skip = ("ro",)
    pick = lambda g: {k: g[k] for k in g if k not in skip}  # noqa: E731
    assert cosine(pick(grads), pick(exact)) > cosine(pick(dgrads), pick(exact))


class _Readout(nnx.Module):
    def __init__(self, cell, rngs):
        self.cell = cell
        self.readout = nnx.Linear(M.N, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, carry, x):
        carry, y = self.cell(carry, x)
        return carry, self.readout(y)


def test_snap1_through_fused_gates_equals_its_definition():
    """nnx.GRUCell's kernels feed the three gates of unit k from columns k, k+n, k+2n:
    the index maps carry the recurrent kernel's own entries to each unit."""
    model = btnnx.convert(
        _Readout(nnx.GRUCell(M.N_IN, M.N, param_dtype=F64, rngs=nnx.Rngs(0)), nnx.Rngs(1))
    )
    graphdef, values, rest = nnx.split(model, nnx.Param, ...)
    treedef = jax.tree_util.tree_structure(values)

    def step(p, carry, x):
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves(p)), rest)
        return m(carry, x)

    params = nnx.as_pure(values)
    gates = jnp.arange(3 * M.N) % M.N
    unit_of = {"cell": {"dense_i": {"kernel": jnp.broadcast_to(gates, (M.N_IN, 3 * M.N))}}}
    unit_of["cell"]["dense_i"]["bias"] = gates
    unit_of["cell"]["dense_h"] = {"kernel": jnp.broadcast_to(gates, (M.N, 3 * M.N))}
    if "bias" in params["cell"]["dense_h"]:
        unit_of["cell"]["dense_h"]["bias"] = gates
    flat_step, flat_params, flat_units = _flat_problem(step, params, unit_of)
    k = jax.random.split(jax.random.PRNGKey(2), 2)
    xs = jax.random.normal(k[0], (T, B, M.N_IN), F64)
    targets = jax.random.normal(k[1], (T, B, 2), F64)
    h0 = jnp.full((B, M.N), 0.3, F64)
    reference = _batch_oracle(flat_step, flat_params, h0, xs, targets, flat_units)
    learner = btnnx.compile(model, M.mse, bt.SnAp1())
    state = learner.init(model, h0, xs[0])
    _, grads, _ = nnx.jit(learner.scan)(model, state, xs, targets)
    got = dict(zip(flat_params, leaves(nnx.as_pure(grads))))
    for name in flat_params:
        assert rel_err(got[name], reference[name]) <= 1e-10, name


def _flat_problem(step, params, unit_of):
    """The step over a flat ``{path: leaf}`` dict (the oracle takes flat dicts)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(p) for p, _ in paths]
    units = {
        jax.tree_util.keystr(p): u for p, u in jax.tree_util.tree_flatten_with_path(unit_of)[0]
    }

    def flat_step(p, h, x):
        return step(jax.tree_util.tree_unflatten(treedef, [p[n] for n in names]), h, x)

    return flat_step, {n: a for n, (_, a) in zip(names, paths)}, units


@pytest.mark.parametrize(
    "model",
    ["lif", *(pytest.param(m, marks=pytest.mark.slow) for m in ("lora", "alif"))],
)
def test_snap1_is_d_rtrl_where_no_op_reads_its_own_state(model):
    step, make_params, names = {
        "lif": (M.lif_step, M.lif_params, ("i", "v")),
        "lora": (M.lif_lora_step, M.lora_params, ("i", "v")),
        "alif": (M.alif_step, M.lif_params, ("i", "v", "a")),
    }[model]
    params, hidden = make_params(), M.hidden_like(names, (B,))
    xs = jax.random.normal(jax.random.PRNGKey(2), (T, B, M.N_IN), F64)
    targets = jax.random.normal(jax.random.PRNGKey(3), (T, B, 2), F64)
    grads = []
    for algo in (bt.SnAp1(), bt.D_RTRL()):
        learner = bt.compile(step, M.mse, algo)
        grads.append(
            jax.jit(learner.scan)(params, learner.init(params, hidden, xs[0]), xs, targets)[1]
        )
        assert learner.graph(params, hidden, xs[0]).self_loops == ()
    for name in params:
        assert rel_err(grads[0][name], grads[1][name]) <= 1e-12, name


def _matvec_op():
    """A user's recurrent op with the four seed rules but no ``input_entries``."""
    prim = bt.register_primitive("test_snap_matvec", lambda x, w: x @ w, replace=True)
    prim.register_etp_rules(
        yw_to_w=lambda v, t: {"weight": t["weight"] * v[None, :]},
        xy_to_dw=lambda x, g, w: {"weight": jnp.outer(x, g)},
        init_drtrl=lambda xv, yv, wv, s: {"weight": jnp.zeros(wv["weight"].shape + (s,))},
        init_pp=lambda xv, yv, wv, s: jnp.zeros(yv.shape + (s,)),
    )
    return prim


def test_snap1_needs_the_input_entries_rule_of_a_recurrent_op():
    prim = _matvec_op()

    def step(p, h, x):
        h = jnp.tanh(x @ p["wx"] + prim.bind(h, p["wh"]))
        return h, h @ p["ro"]

    params = {k: v for k, v in M.rnn_params().items() if k != "b"}
    h, x = jnp.zeros(M.N), jnp.zeros(M.N_IN)
    learner = bt.compile(step, M.mse, bt.SnAp1(), batched=False)
    with pytest.raises(
        bt.CompileError,
        match=r"SnAp1: op #0 \(test_snap_matvec\) reads group #0.*"
        r"register_input_entries",
    ):
        learner.init(params, h, x)


def test_snap1_report_warns_where_it_cannot_add_the_diagonal():
    def step(p, h, x):  # the recurrent op reads the state through a roll
        h = jnp.tanh(bt.ops.dense(x, p["wx"], p["b"]) + bt.ops.dense(jnp.roll(h, 1), p["wh"]))
        return h, h @ p["ro"]

    params, h, x = M.rnn_params(), jnp.zeros(M.N), jnp.zeros(M.N_IN)
    report = bt.compile(step, M.mse, bt.SnAp1(), batched=False).report(params, h, x)
    assert any("SnAp-1 keeps D-RTRL's diagonal: op #1 reads group #0" in w for w in report.warnings)
    plain = bt.compile(step, M.mse, bt.D_RTRL(), batched=False).report(params, h, x)
    assert not plain.warnings


@pytest.mark.parametrize("op", ["dense-in_out", "dense-out_in", "lora"])
def test_input_entries_are_the_input_jacobian_entries(op):
    """The rule's ``dy[j]/dx[input_index[j]]`` against ``jax.jacfwd`` (0 where the index is -1)."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    n_in, n_out = 5, 7
    x = jax.random.normal(k[0], (n_in,), F64)
    if op == "lora":
        a, b = jax.random.normal(k[1], (n_in, 2), F64), jax.random.normal(k[2], (2, n_out), F64)
        base = jax.random.normal(k[3], (n_in, n_out), F64)
        fn = lambda x: bt.ops.lora(x, a, b, jnp.ones(n_out), scale=0.7, base_weight=base)  # noqa: E731
    else:
        layout = op.split("-")[1]
        shape = (n_in, n_out) if layout == "in_out" else (n_out, n_in)
        w = jax.random.normal(k[1], shape, F64)
        fn = lambda x: bt.ops.dense(x, w, jnp.ones(n_out), weight_layout=layout)  # noqa: E731
    index = jnp.array([0, 4, -1, 2, 2, 1, 3])
    jaxpr = jax.make_jaxpr(fn)(x)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if bt.registry.is_etp_primitive(e.primitive)]
    operands = [
        jaxpr.consts[jaxpr.jaxpr.constvars.index(v)] if v in jaxpr.jaxpr.constvars else x
        for v in eqn.invars
    ]
    rule = bt.registry.get_rule(eqn.primitive, "input_entries")
    got = rule(*operands, input_index=np.asarray(index), **eqn.params)
    jac = jax.jacfwd(fn)(x)
    want = jnp.where(index >= 0, jac[jnp.arange(n_out), jnp.maximum(index, 0)], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    ("x_shape", "k_shape", "options"),
    [
        ((6, 6, 2), (3, 3, 2, 2), {"padding": "SAME"}),
        (
            (7, 5, 4),
            (3, 2, 2, 6),
            dict(strides=(2, 1), padding="VALID", rhs_dilation=(1, 2), feature_group_count=2),
        ),
        (
            (4, 7),
            (4, 2, 3),
            dict(strides=2, padding="SAME_LOWER", layout="channels_first", feature_group_count=2),
        ),
    ],
    ids=["same", "strided-dilated-grouped", "channels-first"],
)
def test_conv_input_entries_are_the_input_jacobian_entries(x_shape, k_shape, options):
    """Each output element reads an input element inside its window (or none, -1)."""
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    x = jax.random.normal(k[0], x_shape, F64)
    w = jax.random.normal(k[1], k_shape, F64)
    fn = lambda x: bt.ops.conv(x, w, **options)  # noqa: E731
    jac = np.asarray(jax.jacfwd(fn)(x)).reshape(-1, x.size)
    rng = np.random.default_rng(0)
    index = np.array([rng.choice(np.flatnonzero(row)) if row.any() else -1 for row in jac])
    index[::5] = -1
    jaxpr = jax.make_jaxpr(fn)(x)
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if bt.registry.is_etp_primitive(e.primitive)]
    rule = bt.registry.get_rule(eqn.primitive, "input_entries")
    got = rule(x, w, input_index=index, **eqn.params)
    want = np.where(index >= 0, jac[np.arange(len(index)), np.maximum(index, 0)], 0.0)
    assert (want != 0).sum() > len(index) // 2  # the check sees real taps
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)


@pytest.mark.slow
def test_snap1_over_one_window_is_bptt_and_resets_like_d_rtrl():
    params, h0, xs, targets, _ = _rnn_case()
    learner = bt.compile(M.rnn_step, M.mse, bt.SnAp1())
    state = learner.init(params, h0, xs[0])
    _, grads, after = jax.jit(learner.window)(params, state, xs, targets)
    reference = bptt_grad(M.rnn_step, M.mse, params, h0, xs, targets, True)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name
    fresh = learner.reset(after, jnp.array([True, False]))
    for new, old in zip(leaves(fresh.traces), leaves(after.traces)):
        assert not new[0].any() and bool((new[1] == old[1]).all())
