"""The compiler against independent oracles.

``D`` and ``D_f`` are checked against ``jax.jacfwd`` (or ``jax.jacrev`` where a
``custom_vjp`` must be honoured) of each model rewritten by hand in plain ``jnp``
with the ETP outputs passed in as explicit arguments: that *is* the step "with ETP
outputs held fixed", built without the compiler. The per-position blocks are cut
out of the full Jacobians, and every other entry of those Jacobians is asserted to
be zero, so the block form the compiler returns loses nothing for these models.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import braintrace
from braintrace import ops
from braintrace.compiler import CompileError, compile_graph
from braintrace.compiler.forward import forward
from braintrace.testing.models import (
    N_IN,
    N,
    alif_step,
    gru_params,
    gru_step,
    hidden_like,
    lif_params,
    lif_step,
    mse,
    rnn_params,
    rnn_step,
    spike,
)

B = 3
F8 = 8  # bytes per float64

sig = jax.nn.sigmoid


# -- helpers ------------------------------------------------------------------------------


def keystrs(tree):
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def op_by_weight(graph):
    """Map the ``params`` path of each op's 'weight' to the op index."""
    table = {op.paths["weight"]: op.index for op in graph.ops}
    assert len(table) == len(graph.ops)
    return table


def relation_pairs(graph):
    """Relations as ``(weight path, group leaf paths)``."""
    return sorted(
        (graph.ops[r.op].paths["weight"], graph.groups[r.group].paths) for r in graph.relations
    )


def pos_diag(jac, out_shape, in_shape):
    """Per-position diagonal of ``jac`` (shape ``out_shape + in_shape``).

    ``in_shape`` is ``out_shape`` or a suffix of it (an unbatched value broadcast
    over the batch). Asserts every other entry is zero (the block form is exact).
    """
    out_shape, in_shape = tuple(out_shape), tuple(in_shape)
    assert out_shape[len(out_shape) - len(in_shape) :] == in_shape
    lead = int(np.prod(out_shape[: len(out_shape) - len(in_shape)], dtype=int))
    p = int(np.prod(in_shape, dtype=int))
    j = np.asarray(jac).reshape(lead, p, p)
    diag = j[:, np.arange(p), np.arange(p)]
    off = j.copy()
    off[:, np.arange(p), np.arange(p)] = 0.0
    np.testing.assert_array_equal(off, 0.0, err_msg="Jacobian is not position-diagonal")
    return diag.reshape(out_shape)


def oracle_d(held, hs, ys):
    """``D[..., a, c]`` from the hand-written held-output step ``held(hs, ys) -> hs'``."""
    jac = jax.jacfwd(held, argnums=0)(hs, ys)
    s = len(hs)
    return np.stack(
        [
            np.stack([pos_diag(jac[a][c], hs[a].shape, hs[c].shape) for c in range(s)], -1)
            for a in range(s)
        ],
        -2,
    )


def oracle_dfs(held, hs, ys, jacobian=jax.jacfwd):
    """``{key: D_f}`` with ``D_f[..., a] = dh_a/dy`` for every ETP output ``ys[key]``."""
    jac = jacobian(held, argnums=1)(hs, ys)
    return {
        key: np.stack([pos_diag(jac[a][key], hs[a].shape, y.shape) for a in range(len(hs))], -1)
        for key, y in ys.items()
    }


class Parts:
    """One step's results and parts, read through ``forward`` (what the learner runs)."""

    def __init__(self, graph, p, h, x):
        self.new_hidden, self.out, parts = forward(graph, p, h, x)
        self.xs, self.d, self.df = parts.xs, parts.d, parts.df


def assert_tree_close(a, b, **kw):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-12, atol=1e-12, **kw)


def check_against_oracle(graph, step, p, h, x, held, hs, ys, xs, jacobian=jax.jacfwd):
    """``parts`` against the oracle; returns the parts."""
    parts = Parts(graph, p, h, x)
    new_h, out = step(p, h, x)
    assert_tree_close(parts.new_hidden, new_h)
    assert_tree_close(parts.out, out)
    by_w = op_by_weight(graph)
    for path, k in by_w.items():
        if xs[path] is None:
            assert parts.xs[k] is None
        else:
            np.testing.assert_array_equal(parts.xs[k], xs[path])
    (group,) = graph.groups
    assert parts.d[0].shape == tuple(group.shape) + (group.num_states,) * 2
    if jacobian is jax.jacfwd:
        np.testing.assert_allclose(parts.d[0], oracle_d(held, hs, ys), rtol=1e-12, atol=1e-14)
    assert len(parts.df) == len(graph.relations)
    dfs = oracle_dfs(held, hs, ys, jacobian)
    for r in graph.relations:
        key = graph.ops[r.op].paths["weight"]
        assert parts.df[r.index].shape == tuple(group.shape) + (group.num_states,)
        np.testing.assert_allclose(parts.df[r.index], dfs[key], rtol=1e-12, atol=1e-14)
    return parts


# -- hand-written models with the ETP outputs held fixed ---------------------------------------


def lif_held(hs, ys):
    i_prev, v_prev = hs
    tau, y = ys["['tau']"], ys["['w']"]
    i = 0.8 * i_prev + y
    v = tau * v_prev * (1.0 - spike(v_prev - 1.0)) + (1.0 - tau) * i
    return i, v


def alif_held(hs, ys):
    a_prev, i_prev, v_prev = hs  # sorted keys: a, i, v
    tau, y = ys["['tau']"], ys["['w']"]
    i = 0.7 * i_prev + y
    v = tau * v_prev + (1.0 - tau) * i - 0.3 * a_prev
    s = spike(v - 1.0 - 0.5 * a_prev)
    a = 0.9 * a_prev + 0.2 * s + 0.1 * jnp.tanh(v)
    return a, i, v


def rnn_held(hs, ys):
    return (jnp.tanh(ys["['wx']"] + ys["['wh']"]),)


def gru_held(hs, ys):
    (h,) = hs
    r = sig(ys["['wir']"] + ys["['whr']"])
    z = sig(ys["['wiz']"] + ys["['whz']"])
    n = jnp.tanh(ys["['win']"] + r * ys["['whn']"])
    return ((1.0 - z) * n + z * h,)


def lif_ys(p, h, x):
    ys = {"['tau']": sig(p["tau"]), "['w']": x @ p["w"] + p["b"]}
    return ys, {"['tau']": None, "['w']": x}


def rnn_ys(p, h, x):
    ys = {"['wx']": x @ p["wx"] + p["b"], "['wh']": h @ p["wh"]}
    return ys, {"['wx']": x, "['wh']": h}


def gru_ys(p, h, x):
    ys = {
        "['wir']": x @ p["wir"] + p["br"],
        "['whr']": h @ p["whr"],
        "['wiz']": x @ p["wiz"] + p["bz"],
        "['whz']": h @ p["whz"],
        "['win']": x @ p["win"] + p["bn"],
        "['whn']": h @ p["whn"] + p["bhn"],
    }
    return ys, {k: (x if k.startswith("['wi") else h) for k in ys}


def _inputs(model, batched):
    lead = (B,) if batched else ()
    x = jax.random.normal(jax.random.PRNGKey(7), lead + (N_IN,)) * 1.5
    if model == "lif":
        return lif_step, lif_params(), hidden_like(["i", "v"], lead), x
    if model == "alif":
        return alif_step, lif_params(), hidden_like(["i", "v", "a"], lead), x
    h = jax.random.normal(jax.random.PRNGKey(3), lead + (N,)) * 0.7
    if model == "rnn":
        return rnn_step, rnn_params(), h, x
    return gru_step, gru_params(), h, x


MODELS = {
    # name: (held, ys, group leaf paths, op weight paths)
    "lif": (lif_held, lif_ys, ("hidden['i']", "hidden['v']"), ["['tau']", "['w']"]),
    "alif": (
        alif_held,
        lif_ys,
        ("hidden['a']", "hidden['i']", "hidden['v']"),
        ["['tau']", "['w']"],
    ),
    "rnn": (rnn_held, rnn_ys, ("hidden",), ["['wh']", "['wx']"]),
    "gru": (
        gru_held,
        gru_ys,
        ("hidden",),
        ["['whn']", "['whr']", "['whz']", "['win']", "['wir']", "['wiz']"],
    ),
}


# -- 1. D and D_f against jax.jacfwd ---------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("model", list(MODELS))
def test_d_and_df_match_jacfwd_oracle(model, batched):
    held, ys_fn, leaf_paths, weights = MODELS[model]
    step, p, h, x = _inputs(model, batched)
    graph = compile_graph(step, p, h, x, batched=batched)
    assert graph.batched is batched
    (group,) = graph.groups
    assert group.paths == leaf_paths
    flat_paths = ["hidden" + k for k in keystrs(h)]
    assert [flat_paths[i] for i in group.leaves] == list(leaf_paths)
    assert tuple(group.shape) == ((B, N) if batched else (N,))
    assert sorted(op_by_weight(graph)) == weights
    # every op has exactly one relation, to the one group
    assert sorted(r.op for r in graph.relations) == list(range(len(graph.ops)))
    assert all(r.dropped == () for r in graph.relations)
    assert all(r.lead == (1 if batched else 0) for r in graph.relations)
    for op in graph.ops:
        if op.x_index is not None:
            assert op.batched is batched

    hs = tuple(h[k] for k in sorted(h)) if isinstance(h, dict) else (h,)
    ys, xs = ys_fn(p, h, x)
    parts = check_against_oracle(graph, step, p, h, x, held, hs, ys, xs)
    d = np.asarray(parts.d[0])
    if model == "rnn":
        np.testing.assert_array_equal(d, 0.0)  # only recurrence is through an ETP op
    else:
        assert np.abs(d).max() > 0.1  # a non-trivial D
    if model == "gru":  # D = z with Flax's convention h' = (1 - z) n + z h
        z = sig(ys["['wiz']"] + ys["['whz']"])
        np.testing.assert_allclose(d[..., 0, 0], z, rtol=1e-12)
    if model == "lif":  # same-step coupling: dv/di^{t-1} = (1 - tau) * 0.8, di/dv^{t-1} = 0
        tau = np.broadcast_to(sig(p["tau"]), d.shape[:-2])
        np.testing.assert_allclose(d[..., 1, 0], (1.0 - tau) * 0.8, rtol=1e-12)
        np.testing.assert_array_equal(d[..., 0, 1], 0.0)
    _check_structural_zeros(graph, parts)
    expected = {"lif": ((True, False), (True, True)), "rnn": ((False,),), "gru": ((True,),)}
    if model in expected:
        assert group.coupling == expected[model]


def _check_structural_zeros(graph, parts):
    """Every block the compiler calls a structural zero is zero in the oracle-checked
    ``D``/``D_f``; the blocks it keeps are not all zero (so the check has teeth)."""
    for group, d in zip(graph.groups, parts.d):
        d = np.asarray(d)
        for a in range(group.num_states):
            for c in range(group.num_states):
                if not group.couples(a, c):
                    np.testing.assert_array_equal(d[..., a, c], 0.0)
    for relation, df in zip(graph.relations, parts.df):
        df = np.asarray(df)
        for a in range(graph.groups[relation.group].num_states):
            if relation.reaches_state(a):
                assert np.abs(df[..., a]).max() > 0.0, (relation, a)
            else:
                np.testing.assert_array_equal(df[..., a], 0.0)


def test_evaluate_is_the_plain_step():
    step, p, h, x = _inputs("alif", True)
    graph = compile_graph(step, p, h, x, batched=True)
    assert_tree_close(graph.evaluate(p, h, x), step(p, h, x))
    with pytest.raises(CompileError, match="structure"):
        Parts(graph, p, {"i": h["i"], "v": h["v"]}, x)


# -- 2. groups and relations --------------------------------------------------------------


def two_layer_step(p, h, x):
    """Two stacked LIF layers of equal width: layer 2's dense reads layer 1's spikes."""
    l1, l2 = p["l1"], p["l2"]
    tau1 = ops.elemwise(l1["tau"], sig)
    i1 = 0.8 * h["l1"]["i"] + ops.dense(x, l1["w"], l1["b"])
    v1 = tau1 * h["l1"]["v"] + (1.0 - tau1) * i1
    s1 = spike(v1 - 0.5)
    tau2 = ops.elemwise(l2["tau"], sig)
    i2 = 0.7 * h["l2"]["i"] + ops.dense(s1, l2["w"], l2["b"])
    v2 = tau2 * h["l2"]["v"] + (1.0 - tau2) * i2
    new = {"l1": {"i": i1, "v": v1}, "l2": {"i": i2, "v": v2}}
    return new, jnp.tanh(v2) @ p["ro"]


def two_layer_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "l1": {
            "w": jax.random.normal(k[0], (N_IN, N)),
            "b": jnp.full((N,), 0.3),
            "tau": jnp.linspace(-1.0, 1.0, N),
        },
        "l2": {
            "w": jax.random.normal(k[1], (N, N)),
            "b": jnp.full((N,), 0.1),
            "tau": jnp.linspace(0.5, -0.5, N),
        },
        "ro": jax.random.normal(k[2], (N, 2)),
    }


def two_layer_hidden(lead=()):
    return {
        "l1": hidden_like(["i", "v"], lead, seed=1),
        "l2": hidden_like(["i", "v"], lead, seed=2),
    }


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_two_layer_groups_and_relations(batched):
    lead = (B,) if batched else ()
    p, h = two_layer_params(), two_layer_hidden(lead)
    x = jnp.linspace(-1.0, 2.0, B * N_IN).reshape(lead + (N_IN,)) if batched else jnp.ones(N_IN)
    graph = compile_graph(two_layer_step, p, h, x, batched=batched)
    g1 = ("hidden['l1']['i']", "hidden['l1']['v']")
    g2 = ("hidden['l2']['i']", "hidden['l2']['v']")
    assert [g.paths for g in graph.groups] == [g1, g2]
    assert [g.leaves for g in graph.groups] == [(0, 1), (2, 3)]
    # layer 1's ops reach only layer 1: the path into layer 2 ends at its dense's input
    assert relation_pairs(graph) == sorted(
        [("['l1']['tau']", g1), ("['l1']['w']", g1), ("['l2']['tau']", g2), ("['l2']['w']", g2)]
    )
    by_w = op_by_weight(graph)
    note = graph.report.ops[by_w["['l1']['w']"]].note
    l2_dense = by_w["['l2']['w']"]
    assert f"feeds the input of op #{l2_dense}" in note
    assert graph.report.ops[by_w["['l1']['w']"]].groups == (0,)
    rep = graph.report
    for path in keystrs(p):
        assert rep.param(path).mode == ("one-step" if path == "['ro']" else "trace")
    assert rep.param("['l1']['w']").groups == (0,)
    assert rep.param("['l2']['b']").groups == (1,)

    # D and D_f against the hand-written held-output model
    def held(hs, ys):
        i1p, v1p, i2p, v2p = hs
        t1, t2 = ys["['l1']['tau']"], ys["['l2']['tau']"]
        i1 = 0.8 * i1p + ys["['l1']['w']"]
        v1 = t1 * v1p + (1.0 - t1) * i1
        i2 = 0.7 * i2p + ys["['l2']['w']"]
        v2 = t2 * v2p + (1.0 - t2) * i2
        return i1, v1, i2, v2

    hs = (h["l1"]["i"], h["l1"]["v"], h["l2"]["i"], h["l2"]["v"])
    s1 = spike(graph.evaluate(p, h, x)[0]["l1"]["v"] - 0.5)
    ys = {
        "['l1']['tau']": sig(p["l1"]["tau"]),
        "['l2']['tau']": sig(p["l2"]["tau"]),
        "['l1']['w']": x @ p["l1"]["w"] + p["l1"]["b"],
        "['l2']['w']": s1 @ p["l2"]["w"] + p["l2"]["b"],
    }
    parts = Parts(graph, p, h, x)
    np.testing.assert_array_equal(parts.xs[by_w["['l2']['w']"]], s1)
    jac = jax.jacfwd(held, argnums=0)(hs, ys)
    for a in (0, 1):  # no coupling between the layers once ETP outputs are held
        for c in (2, 3):
            np.testing.assert_array_equal(jac[a][c], 0.0)
            np.testing.assert_array_equal(jac[c][a], 0.0)
    d = oracle_d(held, hs, ys)
    np.testing.assert_allclose(parts.d[0], d[..., :2, :2], rtol=1e-12)
    np.testing.assert_allclose(parts.d[1], d[..., 2:, 2:], rtol=1e-12)
    dfs = oracle_dfs(held, hs, ys)
    for r in graph.relations:
        key = graph.ops[r.op].paths["weight"]
        sl = slice(0, 2) if r.group == 0 else slice(2, 4)
        np.testing.assert_allclose(parts.df[r.index], dfs[key][..., sl], rtol=1e-12, atol=1e-14)


def test_one_weight_at_two_call_sites():
    def step(p, h, x):
        a = 0.9 * h["a"] + ops.dense(x, p["w"])
        b = 0.5 * h["b"] + ops.dense(jnp.sin(x), p["w"])
        return {"a": a, "b": b}, a + b

    p, h, x = {"w": jnp.ones((N_IN, N))}, hidden_like(["a", "b"]), jnp.arange(1.0, N_IN + 1)
    graph = compile_graph(step, p, h, x)
    assert [op.paths for op in graph.ops] == [{"weight": "['w']"}] * 2
    assert [op.trainables for op in graph.ops] == [{"weight": 0}] * 2
    assert [g.paths for g in graph.groups] == [("hidden['a']",), ("hidden['b']",)]
    assert [(r.op, r.group) for r in graph.relations] == [(0, 0), (1, 1)]
    entry = graph.report.param("['w']")
    assert entry.mode == "trace" and entry.groups == (0, 1)
    parts = Parts(graph, p, h, x)
    np.testing.assert_array_equal(parts.xs[0], x)
    np.testing.assert_array_equal(parts.xs[1], jnp.sin(x))
    np.testing.assert_array_equal(parts.d[0], 0.9)
    np.testing.assert_array_equal(parts.d[1], 0.5)
    np.testing.assert_array_equal(parts.df[0], 1.0)
    np.testing.assert_array_equal(parts.df[1], 1.0)


def test_readout_only_param_is_one_step_exact():
    step, p, h, x = _inputs("lif", False)
    entry = compile_graph(step, p, h, x).report.param("['ro']")
    assert entry.mode == "one-step" and entry.groups == ()
    assert "readout" in entry.reason


def gru_reset_inside_step(p, h, x):
    """GRU variant: the reset gate reaches h only as the input of W_hn's dense op."""
    r = sig(ops.dense(x, p["wir"], p["br"]) + ops.dense(h, p["whr"]))
    z = sig(ops.dense(x, p["wiz"], p["bz"]) + ops.dense(h, p["whz"]))
    n = jnp.tanh(ops.dense(x, p["win"], p["bn"]) + ops.dense(r * h, p["whn"], p["bhn"]))
    h = (1.0 - z) * n + z * h
    return h, h @ p["ro"]


def test_reset_gate_reaching_h_only_through_an_op_input():
    p = gru_params()
    h = jax.random.normal(jax.random.PRNGKey(3), (N,)) * 0.7
    x = jnp.linspace(-1.0, 1.0, N_IN)
    graph = compile_graph(gru_reset_inside_step, p, h, x)
    by_w = op_by_weight(graph)
    traced = {graph.ops[r.op].paths["weight"] for r in graph.relations}
    assert traced == {"['wiz']", "['whz']", "['win']", "['whn']"}
    rep = graph.report
    whn = by_w["['whn']"]
    for path in ("['wir']", "['br']", "['whr']"):
        entry = rep.param(path)
        assert entry.mode == "one-step", entry
        assert f"feeds the input of op #{whn}" in entry.reason
    for path in ("['wiz']", "['bz']", "['whz']", "['win']", "['bn']", "['whn']", "['bhn']"):
        assert rep.param(path).mode == "trace"
    for path in ("['wir']", "['whr']"):
        note = rep.ops[by_w[path]].note
        assert "input of op" in note and rep.ops[by_w[path]].groups == ()

    # D = z still; D_f of W_hn's op through n
    ys, _ = gru_ys(p, h, x)
    r_gate = sig(ys["['wir']"] + ys["['whr']"])
    ys["['whn']"] = (r_gate * h) @ p["whn"] + p["bhn"]
    parts = Parts(graph, p, h, x)
    np.testing.assert_allclose(parts.xs[by_w["['whn']"]], r_gate * h, rtol=1e-14)
    np.testing.assert_allclose(
        parts.d[0][..., 0, 0], sig(ys["['wiz']"] + ys["['whz']"]), rtol=1e-12
    )

    def held(hs, ys):
        z = sig(ys["['wiz']"] + ys["['whz']"])
        n = jnp.tanh(ys["['win']"] + ys["['whn']"])
        return ((1.0 - z) * n + z * hs[0],)

    dfs = oracle_dfs(held, (h,), ys)
    for r in graph.relations:
        key = graph.ops[r.op].paths["weight"]
        np.testing.assert_allclose(parts.df[r.index], dfs[key], rtol=1e-12, atol=1e-14)


def test_plain_jnp_param_and_unused_param():
    def step(p, h, x):
        h = jnp.tanh(ops.dense(x, p["w"]) + 0.5 * h + h @ p["m"])
        return h, h.sum()

    p = {"w": jnp.ones((N_IN, N)) * 0.1, "m": jnp.eye(N) * 0.2 + 0.05, "unused": jnp.ones(2)}
    h, x = jnp.linspace(-1.0, 1.0, N), jnp.ones(N_IN)
    graph = compile_graph(step, p, h, x)
    rep = graph.report
    assert rep.param("['w']").mode == "trace"
    assert rep.param("['m']").mode == "one-step"
    assert "not routed through an ETP op" in rep.param("['m']").reason
    assert rep.param("['unused']").mode == "none"
    # the matmul coupling is not position-preserving: left out of D, and reported
    assert any("dot_general" in d for d in rep.groups[0].dropped)
    assert "dot_general" in str(rep)
    new_h = step(p, h, x)[0]
    parts = Parts(graph, p, h, x)
    np.testing.assert_allclose(parts.d[0][:, 0, 0], 0.5 * (1.0 - new_h**2), rtol=1e-12)
    np.testing.assert_allclose(parts.df[0][:, 0], 1.0 - new_h**2, rtol=1e-12)


def _y_step(mix):
    def step(p, h, x):
        y = ops.dense(x, p["w"], p["b"])
        h = 0.9 * h + mix(y)
        return h, h.sum()

    return step


def _layer_norm(y):
    mu = y.mean()
    return (y - mu) / jnp.sqrt(((y - mu) ** 2).mean() + 1e-5)


def _small():
    p = {
        "w": jnp.arange(N_IN * N, dtype=jnp.float64).reshape(N_IN, N) / 10.0,
        "b": jnp.linspace(-1.0, 1.0, N),
    }
    return p, jnp.linspace(-1.0, 1.0, N), jnp.array([1.0, -2.0, 0.5])


@pytest.mark.parametrize(
    "mix, where",
    [(lambda y: jnp.roll(y, 1), (1, 2, 3, 0)), (lambda y: y[::-1], (3, 2, 1, 0))],
    ids=["roll", "reverse"],
)
def test_a_permutation_of_the_output_is_an_index_map(mix, where):
    """Element moves that keep one position per element are exact (index maps)."""
    p, h, x = _small()
    graph = compile_graph(_y_step(mix), p, h, x)
    (relation,) = graph.relations
    assert relation.index_map == where
    assert graph.report.param("['w']").gradient == "exact"
    parts = Parts(graph, p, h, x)
    np.testing.assert_array_equal(parts.df[0][..., 0], 1.0)


@pytest.mark.parametrize(
    "mix, bad",
    [(lambda y: jnp.broadcast_to(y.sum(), y.shape), ("broadcast_in_dim", "reduce_sum"))],
    ids=["sum"],
)
def test_non_position_preserving_path_has_no_relation(mix, bad):
    p, h, x = _small()
    graph = compile_graph(_y_step(mix), p, h, x)
    assert graph.relations == ()
    rep = graph.report
    note = rep.ops[0].note
    assert "not position-preserving" in note
    assert any(b in note for b in bad), note
    for path in ("['w']", "['b']"):
        assert rep.param(path).mode == "one-step"
        assert "not position-preserving" in rep.param(path).reason
    assert any("no ETP op reaches a hidden state" in w for w in rep.warnings)
    assert "no ETP op reaches a hidden state" in str(rep)
    parts = Parts(graph, p, h, x)
    assert parts.df == ()
    np.testing.assert_array_equal(parts.d[0], 0.9)


def test_direct_path_kept_and_sum_path_dropped():
    """``h' = 0.9 h + y + sum(y)``: D_f keeps the direct path (1), drops the sum.

    Regression: the node that adds the broadcast sum used to cut *all* its operands,
    zeroing both ``D`` (0.9) and ``D_f`` (1) although their paths are direct.
    """
    p, h, x = _small()
    graph = compile_graph(_y_step(lambda y: y + y.sum()), p, h, x)
    (rel,) = graph.relations
    assert "reduce_sum" in rel.dropped
    assert "reduce_sum" in graph.report.ops[0].note and "drops" in graph.report.ops[0].note
    parts = Parts(graph, p, h, x)
    np.testing.assert_array_equal(parts.d[0], 0.9)
    np.testing.assert_array_equal(parts.df[0], 1.0)
    # the full Jacobian is not position-diagonal: the dropped part is real
    full = jax.jacfwd(lambda y: 0.9 * h + y + y.sum())(jnp.zeros(N))
    assert np.abs(np.asarray(full) - np.eye(N)).max() == 1.0


def test_layer_norm_keeps_only_the_direct_path():
    p, h, x = _small()
    graph = compile_graph(_y_step(_layer_norm), p, h, x)
    (rel,) = graph.relations
    assert "reduce_sum" in rel.dropped
    assert "D_f of group #0 drops paths through" in graph.report.ops[0].note
    y = x @ p["w"] + p["b"]
    std = jnp.sqrt(((y - y.mean()) ** 2).mean() + 1e-5)
    parts = Parts(graph, p, h, x)
    # held mean and std: d/dy_k of (y_k - mu) / std = 1 / std
    np.testing.assert_allclose(parts.df[0][:, 0], 1.0 / std, rtol=1e-12)
    np.testing.assert_array_equal(parts.d[0], 0.9)


def test_integer_and_boolean_hidden_leaves_are_ignored():
    def step(p, h, x):
        v = 0.9 * h["v"] + ops.dense(x, p["w"])
        return {"v": v, "count": h["count"] + 1, "flag": v > 1.0}, v.sum()

    p, x = {"w": jnp.ones((N_IN, N))}, jnp.ones(N_IN)
    h = {"v": jnp.linspace(0.0, 1.0, N), "count": jnp.int32(0), "flag": jnp.zeros(N, bool)}
    graph = compile_graph(step, p, h, x)
    (group,) = graph.groups
    assert group.paths == ("hidden['v']",) and group.leaves == (2,)
    ignored = dict(graph.report.ignored_hidden)
    assert set(ignored) == {"hidden['count']", "hidden['flag']"}
    assert "int32" in ignored["hidden['count']"] and "bool" in ignored["hidden['flag']"]
    assert "hidden['count']" in str(graph.report)
    parts = Parts(graph, p, h, x)
    np.testing.assert_array_equal(parts.d[0], 0.9)
    assert parts.new_hidden["count"] == 1


def test_model_without_etp_op_compiles_with_loud_warning():
    def step(p, h, x):
        h = jnp.tanh(x @ p["w"] + h * p["u"])
        return h, h.sum()

    p, h, x = {"w": jnp.ones((N_IN, N)), "u": jnp.full(N, 0.5)}, jnp.zeros(N), jnp.ones(N_IN)
    graph = compile_graph(step, p, h, x)
    assert graph.ops == () and graph.relations == ()
    text = str(graph.report)
    assert "!! NO ETP OP FOUND" in text
    assert all(e.mode == "one-step" for e in graph.report.params)
    parts = Parts(graph, p, h, x)
    new_h = step(p, h, x)[0]
    np.testing.assert_allclose(parts.d[0][:, 0, 0], 0.5 * (1.0 - new_h**2), rtol=1e-12)


# -- 3. jaxpr handling --------------------------------------------------------------------


@jax.jit
def _jitted_dense(x, w, b):
    return ops.dense(x, w, b)


def lif_with_jitted_helper(p, h, x):
    tau = ops.elemwise(p["tau"], sig)
    i = 0.8 * h["i"] + _jitted_dense(x, p["w"], p["b"])
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    out = jnp.tanh(v) @ p["ro"] + spike(v - 1.0) @ p["ro"]
    return {"i": i, "v": v}, out


@pytest.mark.parametrize(
    "step",
    [jax.jit(lif_step), lif_with_jitted_helper, jax.checkpoint(lif_step)],
    ids=["jit-step", "jit-helper", "checkpoint"],
)
def test_jitted_steps_still_show_their_ops(step):
    _, p, h, x = _inputs("lif", False)
    graph = compile_graph(step, p, h, x)
    assert [op.primitive.name for op in graph.ops] == ["etp_elemwise", "etp_mv"]
    ys, xs = lif_ys(p, h, x)
    check_against_oracle(graph, lif_step, p, h, x, lif_held, (h["i"], h["v"]), ys, xs)


@jax.custom_vjp
def vjp_spike(v):
    return (v > 0).astype(v.dtype)


def _vjp_spike_fwd(v):
    return vjp_spike(v), v


def _vjp_spike_bwd(v, g):
    return (g / (1.0 + 4.0 * jnp.abs(v)) ** 2,)


vjp_spike.defvjp(_vjp_spike_fwd, _vjp_spike_bwd)


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_custom_vjp_surrogate_is_honoured(batched):
    """D through a ``custom_vjp`` spike uses its custom derivative, as reverse mode does.

    Regression: ``parts`` did forward mode through the ``custom_vjp`` call and JAX
    refused it ("can't apply forward-mode autodiff (jvp) to a custom_vjp function").
    """

    def step(p, h, x):
        tau = ops.elemwise(p["tau"], sig)
        i = 0.8 * h["i"] + ops.dense(x, p["w"], p["b"])
        v = tau * h["v"] * (1.0 - vjp_spike(h["v"] - 1.0)) + (1.0 - tau) * i
        return {"i": i, "v": v}, vjp_spike(v - 1.0) @ p["ro"]

    def held(hs, ys):
        i_prev, v_prev = hs
        tau = ys["['tau']"]
        i = 0.8 * i_prev + ys["['w']"]
        v = tau * v_prev * (1.0 - vjp_spike(v_prev - 1.0)) + (1.0 - tau) * i
        return i, v

    _, p, h, x = _inputs("lif", batched)
    graph = compile_graph(step, p, h, x, batched=batched)
    assert len(graph.relations) == 2
    ys, xs = lif_ys(p, h, x)
    hs = (h["i"], h["v"])
    parts = check_against_oracle(graph, step, p, h, x, held, hs, ys, xs, jacobian=jax.jacrev)
    jac = jax.jacrev(held, argnums=0)(hs, ys)  # reverse mode honours the custom_vjp
    oracle = np.stack(
        [
            np.stack([pos_diag(jac[a][c], hs[a].shape, hs[c].shape) for c in (0, 1)], -1)
            for a in (0, 1)
        ],
        -2,
    )
    np.testing.assert_allclose(parts.d[0], oracle, rtol=1e-12)
    # the surrogate matters here: the Heaviside derivative would give tau alone
    tau = np.broadcast_to(sig(p["tau"]), oracle.shape[:-2])
    assert np.abs(oracle[..., 1, 1] - tau * (1.0 - np.asarray(vjp_spike(hs[1] - 1.0)))).max() > 1e-3


@jax.custom_vjp
def clip_grad(v):
    return v


def _clip_bwd(_, g):
    return (jnp.clip(g, -0.1, 0.1),)


clip_grad.defvjp(lambda v: (v, None), _clip_bwd)


def test_custom_vjp_with_a_nonlinear_bwd_is_refused_by_name():
    """Forward mode needs the bwd rule's transpose: a clipping bwd has none."""

    def step(p, h, x):
        h = clip_grad(0.9 * h) + ops.dense(x, p["w"])
        return h, h

    p, h, x = _small()
    graph = compile_graph(step, p, h, x)
    with pytest.raises(CompileError, match=r"custom_vjp function \(bwd rule '_clip_bwd'\).*linear"):
        Parts(graph, p, h, x)


def test_where_select_and_cond_inside_a_step():
    def step(p, h, x):
        y = ops.dense(x, p["w"], p["b"])
        a = jnp.where(h["a"] > 0, 0.9 * h["a"], 0.4 * h["a"]) + y
        b = lax.select(h["b"] > a, jnp.tanh(h["b"]), 0.3 * h["b"]) + 0.5 * a
        c = lax.cond(x.sum() > 0, lambda u, w: 0.8 * u + w, lambda u, w: jnp.sin(u) - w, h["c"], a)
        return {"a": a, "b": b, "c": c}, a + b + c

    def held_for(positive):
        def held(hs, ys):
            ha, hb, hc = hs
            y = ys["['w']"]
            a = jnp.where(ha > 0, 0.9 * ha, 0.4 * ha) + y
            b = jnp.where(hb > a, jnp.tanh(hb), 0.3 * hb) + 0.5 * a
            c = 0.8 * hc + a if positive else jnp.sin(hc) - a
            return a, b, c

        return held

    p, _, _ = _small()
    h = hidden_like(["a", "b", "c"], seed=5)
    for x in (jnp.array([1.0, -2.0, 2.5]), jnp.array([1.0, -2.0, 0.5])):
        held = held_for(float(x.sum()) > 0)
        graph = compile_graph(step, p, h, x)
        (group,) = graph.groups
        assert group.paths == ("hidden['a']", "hidden['b']", "hidden['c']")
        ys = {"['w']": x @ p["w"] + p["b"]}
        check_against_oracle(graph, step, p, h, x, held, (h["a"], h["b"], h["c"]), ys, {"['w']": x})


def test_cond_branches_are_inlined_and_keep_their_own_paths():
    """One branch sums ``y``, the other adds it elementwise: inlined, ``y`` keeps the
    elementwise path (a relation whose ``D_f`` drops the sum) and ``h`` its ``0.8``.

    (Before branches were inlined, a ``cond`` was one node and the bad path in one
    branch cut ``y`` as a whole.)
    """

    def step(p, h, x):
        y = ops.dense(x, p["w"], p["b"])
        h = lax.cond(x.sum() > 0, lambda u, w: 0.8 * u + w.sum(), lambda u, w: 0.8 * u + w, h, y)
        return h, h

    p, h, x = _small()
    graph = compile_graph(step, p, h, x)
    (relation,) = graph.relations
    assert "reduce_sum" in relation.dropped
    assert graph.report.param("['w']").mode == "trace"
    assert graph.report.control_flow[0][:2] == ("cond #0 (2 branches)", "inlined")
    np.testing.assert_array_equal(Parts(graph, p, h, x).d[0], 0.8)


def test_loops_inside_a_step():
    """A scan or static fori_loop on the state is composed; a while loop is refused."""
    p, h, x = _small()

    def scan_step(p, h, x):
        h, _ = lax.scan(lambda c, _: (0.9 * c, None), h, None, length=2)
        return h + ops.dense(x, p["w"]), h

    def while_step(p, h, x):
        n = jnp.int32(x.sum() > 0) + 1  # traced bound: lowers to a while
        h = lax.fori_loop(0, n, lambda i, c: 0.9 * c, h)
        return h + ops.dense(x, p["w"]), h

    def static_fori_step(p, h, x):
        h = lax.fori_loop(0, 2, lambda i, c: 0.9 * c, h)
        return h + ops.dense(x, p["w"]), h

    for step in (scan_step, static_fori_step):
        graph = compile_graph(step, p, h, x)
        assert graph.report.control_flow[0][1] == "composed"
        np.testing.assert_allclose(Parts(graph, p, h, x).d[0], 0.81, rtol=1e-6)
    with pytest.raises(CompileError, match=r"while loop #0 carries hidden"):
        compile_graph(while_step, p, h, x)


def test_etp_op_inside_a_cond_branch_is_traced():
    def step(p, h, x):
        y = lax.cond(x.sum() > 0, lambda: ops.dense(x, p["w"]), lambda: jnp.zeros(N))
        return 0.9 * h + y, h

    p, h, x = _small()
    graph = compile_graph(step, p, h, x)
    assert graph.report.param("['w']").mode == "trace"
    parts = Parts(graph, p, h, x)
    taken = float(x.sum()) > 0
    np.testing.assert_array_equal(parts.xs[0], x if taken else 0 * x)


# -- 4. every CompileError ----------------------------------------------------------------


def test_compile_error_type():
    assert issubclass(CompileError, ValueError)
    assert braintrace.CompileError is CompileError
    assert braintrace.compiler.CompileError is CompileError


def _dense_step(weight_of, **kw):
    def step(p, h, x):
        return 0.9 * h + ops.dense(x, weight_of(p, h), **kw), h

    return step


CONST_W = jnp.ones((N_IN, N))


@pytest.mark.parametrize(
    "step, match",
    [
        (
            _dense_step(lambda p, h: p["w"].T, weight_layout="out_in"),
            r"ETP op #0 \(etp_mv\): params\['w'\] reaches its trainable input 'weight' through "
            r"transpose",
        ),
        (_dense_step(lambda p, h: p["w"] * 2), r"params\['w'\] .*'weight' through mul"),
        (
            _dense_step(lambda p, h: jnp.ones((N_IN, N)) * h.sum()),
            r"ETP op #0.*'weight' is computed inside the step \(via .*mul",
        ),
    ],
    ids=["transpose", "mul", "computed"],
)
def test_trainable_input_must_be_a_params_leaf(step, match):
    p, h, x = _small()
    with pytest.raises(CompileError, match=match):
        compile_graph(step, p, h, x)


def test_an_op_with_constant_weights_is_a_frozen_layer():
    """All trainables closed over: the op trains nothing and is evaluated like plain jnp."""
    p, h, x = _small()
    step = _dense_step(lambda p, h: CONST_W)
    graph = compile_graph(step, p, h, x)
    assert graph.ops == () and graph.relations == ()
    np.testing.assert_allclose(graph.evaluate(p, h, x)[0], step(p, h, x)[0])
    _, _, parts = forward(graph, p, h, x)  # the frozen op mixes positions: D is cut
    np.testing.assert_array_equal(parts.d[0], 0.9)


def test_cast_weight_and_hidden_weight_are_refused():
    p, h, x = _small()
    p32 = {"w": p["w"].astype(jnp.float32), "b": p["b"]}
    step = _dense_step(lambda p, h: p["w"].astype(jnp.float64))
    with pytest.raises(CompileError, match=r"params\['w'\] .* through convert_element_type"):
        compile_graph(step, p32, h, x)

    def hidden_weight(p, h, x):
        return {"v": 0.9 * h["v"] + ops.dense(x, h["m"]), "m": h["m"]}, h["v"]

    with pytest.raises(CompileError, match=r"'weight' is hidden\['m'\]"):
        compile_graph(hidden_weight, p, {"v": h, "m": jnp.ones((N_IN, N))}, x)


def test_bias_through_a_transform_names_the_bias():
    def step(p, h, x):
        return 0.9 * h + ops.dense(x, p["w"], -p["b"]), h

    p, h, x = _small()
    with pytest.raises(
        CompileError,
        match=r"params\['b'\] reaches its trainable input 'bias' "
        r"through neg",
    ):
        compile_graph(step, p, h, x)


def _hstep(update):
    def step(p, h, x):
        v = 0.9 * h["v"] + ops.dense(x, p["w"])
        return update(v), v.sum()

    return step


@pytest.mark.parametrize(
    "step, match",
    [
        (
            _hstep(lambda v: {"v": jnp.concatenate([v, v])}),
            r"hidden\['v'\] changes across the step from float64\[4\] to float64\[8\]",
        ),
        (
            _hstep(lambda v: {"v": v.astype(jnp.float32)}),
            r"hidden\['v'\] changes across the step from float64\[4\] to float32\[4\]",
        ),
        (_hstep(lambda v: {"v": v, "extra": v}), r"new_hidden has structure .* but hidden has"),
        (_hstep(lambda v: [v]), r"new_hidden has structure"),
    ],
    ids=["shape", "dtype", "extra-leaf", "list"],
)
def test_hidden_must_keep_structure_shape_and_dtype(step, match):
    p, h, x = _small()
    with pytest.raises(CompileError, match=match):
        compile_graph(step, p, {"v": h}, x)


def test_step_must_return_a_pair():
    p, h, x = _small()

    def one(p, h, x):
        return 0.9 * h + ops.dense(x, p["w"])

    def three(p, h, x):
        v = 0.9 * h + ops.dense(x, p["w"])
        return v, v, v

    with pytest.raises(CompileError, match=r"must return \(new_hidden, out\); got an array\."):
        compile_graph(one, p, h, x)
    with pytest.raises(CompileError, match=r"got tuple of length 3"):
        compile_graph(three, p, h, x)


def test_no_hidden_state_is_refused():
    p, _, x = _small()

    def step(p, h, x):
        return h, ops.dense(x, p["w"])

    for empty in ({}, (), None):
        with pytest.raises(CompileError, match="hidden has no leaves"):
            compile_graph(step, p, empty, x)


def test_non_array_leaf_is_refused():
    p, h, x = _small()
    with pytest.raises(CompileError, match=r"params\['name'\] is a str, not an array"):
        compile_graph(_dense_step(lambda p, h: p["w"]), dict(p, name="dense"), h, x)


def test_batched_needs_one_leading_axis():
    p, _, _ = _small()
    step = _hstep(lambda v: {"v": v})
    h = {"v": jnp.zeros((2, N))}
    with pytest.raises(CompileError, match=r"leading sizes hidden\['v'\]: 2, x: 3"):
        compile_graph(step, p, h, jnp.zeros((3, N_IN)), batched=True)
    with pytest.raises(CompileError, match=r"x: None"):
        compile_graph(step, p, h, jnp.zeros(()), batched=True)
    compile_graph(step, p, h, jnp.zeros((2, N_IN)), batched=True)  # the consistent case


# -- 5. the report --------------------------------------------------------------------------


def _no_op_step(p, h, x):
    h = jnp.tanh(x @ p["w"] + h)
    return h, h.sum()


def _report_cases():
    x = jnp.linspace(-1.0, 1.0, N_IN)
    hv = jnp.linspace(-0.5, 0.5, N)
    small = _small()[0]
    return {
        "lif": (lif_step, lif_params(), hidden_like(["i", "v"]), x),
        "alif": (alif_step, lif_params(), hidden_like(["i", "v", "a"]), x),
        "rnn": (rnn_step, rnn_params(), hv, x),
        "gru": (gru_step, gru_params(), hv, x),
        "gru-reset": (gru_reset_inside_step, gru_params(), hv, x),
        "two-layer": (two_layer_step, two_layer_params(), two_layer_hidden(), x),
        "roll": (_y_step(lambda y: jnp.roll(y, 1)), small, hv, x),
        "no-op": (_no_op_step, {"w": jnp.ones((N_IN, N)), "unused": jnp.ones(3)}, hv, x),
    }


@pytest.mark.parametrize("case", list(_report_cases()))
def test_report_lists_every_param_leaf_once(case):
    step, p, h, x = _report_cases()[case]
    rep = compile_graph(step, p, h, x).report
    assert [e.path for e in rep.params] == keystrs(p)
    for e, leaf in zip(rep.params, jax.tree_util.tree_leaves(p)):
        assert e.shape == leaf.shape and e.dtype == str(leaf.dtype)
        assert e.mode in ("trace", "one-step", "none")
        assert e.gradient in ("exact", "approximate", "truncated")
        assert (e.mode == "trace") == bool(e.groups)
        assert e.reason
        # truncated exactly when it has no trace but reaches the hidden state
        assert (e.gradient == "truncated") == (e.mode == "one-step" and "readout" not in e.reason)
    text = str(rep)
    for e in rep.params:
        rows = re.findall(r"^  " + re.escape(e.path) + r"\s.*$", text, re.M)
        assert len(rows) == 1
        assert re.search(rf"\s{e.mode}\s+{e.gradient}\s", rows[0]), rows[0]
    assert "trace memory" not in text  # the learner fills it in, the compiler does not


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("model", ["lif", "alif", "rnn", "gru"])
def test_report_modes_classes_and_groups(model, batched):
    step, p, h, x = _inputs(model, batched)
    rep = compile_graph(step, p, h, x, batched=batched).report
    ro = rep.param("['ro']")
    assert (ro.mode, ro.gradient) == ("one-step", "exact") and "readout" in ro.reason
    traced = [e for e in rep.params if e.path != "['ro']"]
    assert {e.mode for e in traced} == {"trace"}
    if model in ("lif", "alif"):  # driven by external input only: the exact class
        assert {e.gradient for e in traced} == {"exact"}
    else:  # every parameter of a recurrent group, biases included, is approximate
        assert {e.gradient for e in traced} == {"approximate"}
        for e in traced:
            if model == "rnn":
                assert re.search(
                    r"op #\d+ \(etp_m[mv]: params\['wh'\]\) reads group #0, "
                    r"which it drives",
                    e.reason,
                ), e.reason
            else:  # the three recurrent kernels, in one sentence
                assert re.search(
                    r"op #\d+ \(etp_m[mv]: params\['whr'\]\), op #\d+ .* and "
                    r"op #\d+ \(etp_m[mv]: params\['whn'\], params\['bhn'\]\) "
                    r"read group #0, which they drive",
                    e.reason,
                ), e.reason
    (g,) = rep.groups
    s = {"lif": 2, "alif": 3, "rnn": 1, "gru": 1}[model]
    assert g.num_states == s and tuple(g.position_shape) == (N,)  # batch axis not a position


def _expected_bytes(shape_of_trace_pieces):
    return sum(int(np.prod(s)) for s in shape_of_trace_pieces) * F8


def test_trace_memory_is_printed_only_when_a_learner_fills_it():
    rep = compile_graph(*_report_cases()["lif"]).report
    assert rep.trace_memory == () and "trace memory" not in str(rep)
    filled = dataclasses.replace(rep, trace_memory=(("d_rtrl", 320), ("pp_prop", 3 * 1024)))
    assert "trace memory per sample: d_rtrl 320 B, pp_prop 3.0 KiB" in str(filled)


@pytest.mark.parametrize("model", ["lif", "gru"])
def test_learner_report_carries_its_trace_memory(model):
    """Trace bytes per sample from the rules' documented shapes:
    dense D-RTRL {'weight': (in, out, S), 'bias': (out, S)}; pp_prop (out, S) + x (in,);
    elementwise {'weight': (n, S)} for both."""
    step, p, h, x = _inputs(model, True)
    if model == "lif":
        drtrl = [(N_IN, N, 2), (N, 2), (N, 2)]
        pp = [(N, 2), (N_IN,), (N, 2)]
    else:
        drtrl = [(N_IN, N, 1), (N, 1)] * 3 + [(N, N, 1)] * 3 + [(N, 1)]  # + bhn
        pp = [(N, 1), (N_IN,)] * 3 + [(N, 1), (N,)] * 3
    for algorithm, pieces in ((braintrace.D_RTRL(), drtrl), (braintrace.pp_prop(0.5), pp)):
        rep = braintrace.compile(step, mse, algorithm, batched=True).report(p, h, x)
        ((_, n_bytes),) = rep.trace_memory
        assert n_bytes == _expected_bytes(pieces) > 0
        assert f"{n_bytes} B" in str(rep)


# -- 6. a vmapped per-sample step ------------------------------------------------------------


@pytest.mark.parametrize("model", ["lif", "alif", "gru"])
def test_vmapped_per_sample_step(model):
    step, p, h, x = _inputs(model, True)
    step_v = jax.vmap(step, in_axes=(None, 0, 0))
    graph_v = compile_graph(step_v, p, h, x, batched=True)
    sample = jax.tree_util.tree_map(lambda a: a[0], (h, x))
    graph_1 = compile_graph(step, p, *sample)
    assert [op.primitive.name for op in graph_v.ops if op.x_index is not None] == [
        op.primitive.name.replace("_mv", "_mm") for op in graph_1.ops if op.x_index is not None
    ]
    assert [g.paths for g in graph_v.groups] == [g.paths for g in graph_1.groups]
    assert [g.leaves for g in graph_v.groups] == [g.leaves for g in graph_1.groups]
    assert relation_pairs(graph_v) == relation_pairs(graph_1)
    assert [(e.path, e.mode, e.gradient, e.groups) for e in graph_v.report.params] == [
        (e.path, e.mode, e.gradient, e.groups) for e in graph_1.report.params
    ]

    parts_v = Parts(graph_v, p, h, x)
    rel_1 = {graph_1.ops[r.op].paths["weight"]: r.index for r in graph_1.relations}
    for b in range(B):
        hb, xb = jax.tree_util.tree_map(lambda a, b=b: a[b], (h, x))
        parts_1 = Parts(graph_1, p, hb, xb)
        np.testing.assert_allclose(parts_v.d[0][b], parts_1.d[0], rtol=1e-12, atol=1e-15)
        for r in graph_v.relations:
            j = rel_1[graph_v.ops[r.op].paths["weight"]]
            np.testing.assert_allclose(
                parts_v.df[r.index][b], parts_1.df[j], rtol=1e-12, atol=1e-15
            )
    # and the same as compiling the batched step directly
    parts_b = Parts(compile_graph(step, p, h, x, batched=True), p, h, x)
    np.testing.assert_allclose(parts_v.d[0], parts_b.d[0], rtol=1e-12, atol=1e-15)
