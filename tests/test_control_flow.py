"""Control flow inside a step: cond / switch, sub-step loops, while loops.

Oracles: BPTT (``jax.grad`` through ``lax.scan``, float64) for the exact class and
for whole-sequence windows; the compile report for how each construct was handled.
``docs/algorithms.md``, "Control flow".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import braintrace as bt
from braintrace import ops
from braintrace.testing.reference import bptt_grad

N_IN, N, T, B = 3, 4, 6, 2
EXACT = 1e-10
_SLOW = pytest.mark.slow


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64) * scale


def _lif(v, i, y):
    i = 0.8 * i + y
    v = 0.9 * v * (1.0 - bt.surrogate.spike(v - 1.0)) + 0.1 * i
    return v, i


# -- models (x = (input, flag or branch index)) ---------------------------------------------


def reset_step(p, h, x):
    """LIF whose state is reset by ``lax.cond`` when the flag is set."""
    xin, flag = x
    v, i = lax.cond(
        flag > 0,
        lambda v, i: (jnp.zeros_like(v), jnp.zeros_like(i)),
        lambda v, i: (v, i),
        h["v"],
        h["i"],
    )
    v, i = _lif(v, i, ops.dense(xin, p["w"], p["b"]))
    return {"v": v, "i": i}, v


def switch_step(p, h, x):
    """LIF driven by one of two ETP ops (two weights), picked per step by ``lax.switch``."""
    xin, k = x
    y = lax.switch(k, [lambda u: ops.dense(u, p["w0"]), lambda u: ops.dense(u, p["w1"])], xin)
    v, i = _lif(h["v"], h["i"], y)
    return {"v": v, "i": i}, v


def nested_step(p, h, x):
    """A three-way switch whose last branch holds a cond (ops reused across branches)."""
    xin, k = x

    def third(u):
        return lax.cond(
            u.sum() > 0,
            lambda u: ops.dense(u, p["w0"]),
            lambda u: ops.dense(jnp.tanh(u), p["w1"]),
            u,
        )

    y = lax.switch(
        k, [lambda u: ops.dense(u, p["w0"]), lambda u: ops.dense(u, p["w1"]), third], xin
    )
    v, i = _lif(h["v"], h["i"], y)
    return {"v": v, "i": i}, v


def trap_step(p, h, x):
    """A branch whose input makes ``log`` and ``sqrt`` non-finite when it is not taken."""
    xin, flag = x

    def risky(v, u):  # taken only when u > 0
        return v + ops.dense(jnp.log(u), p["w0"]) + jnp.sqrt(u).sum()

    def safe(v, u):
        return v + ops.dense(u, p["w1"])

    v = lax.cond(flag > 0, risky, safe, 0.9 * h, xin)
    return v, v


def fori_step(p, h, x, n_sub=4):
    """LIF integrating ``n_sub`` sub-steps of one input; the ETP op sits in the body."""

    def body(_, s):
        return _lif(*s, ops.dense(x, p["w"], p["b"]))

    v, i = lax.fori_loop(0, n_sub, body, (h["v"], h["i"]))
    return {"v": v, "i": i}, v


def scan_step(p, h, x):
    """LIF scanning over per-sub-step inputs ``x: (4, N_IN)``; the ETP op in the body."""

    def body(s, xk):
        return _lif(*s, ops.dense(xk, p["w"], p["b"])), None

    (v, i), _ = lax.scan(body, (h["v"], h["i"]), x)
    return {"v": v, "i": i}, v


def _params(names):
    return {
        n: jnp.full(N, 0.3) if n == "b" else _normal(j, (N_IN, N), 0.8) for j, n in enumerate(names)
    }


def _lif_hidden(lead=()):
    return {"v": _normal(11, lead + (N,), 0.5), "i": _normal(12, lead + (N,), 0.5)}


def _inputs(kind, lead=()):
    xs = _normal(21, (T,) + lead + (N_IN,), 1.5)
    if kind == "flag":
        flags = jnp.arange(T * int(np.prod(lead, dtype=int))).reshape((T,) + lead) % 3 == 1
        return xs, flags.astype(jnp.int32)
    if kind in ("index", "index3"):
        count = 2 if kind == "index" else 3
        return xs, (jnp.arange(T * int(np.prod(lead, dtype=int))).reshape((T,) + lead) % count)
    if kind == "trap":
        flags = jnp.arange(T * int(np.prod(lead, dtype=int))).reshape((T,) + lead) % 2
        return jnp.where(flags[..., None] > 0, jnp.abs(xs) + 0.1, -jnp.abs(xs)), flags
    if kind == "substeps":
        return _normal(21, (T,) + lead + (4, N_IN), 1.5)
    return xs


MODELS = {
    "reset": (reset_step, ("w", "b"), "flag"),
    "switch": (switch_step, ("w0", "w1"), "index"),
    "nested": (nested_step, ("w0", "w1"), "index3"),
    "trap": (trap_step, ("w0", "w1"), "trap"),
    "fori": (fori_step, ("w", "b"), "plain"),
    "scan": (scan_step, ("w", "b"), "substeps"),
}


def _flat(tree) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _hidden_for(name, lead=()):
    return _normal(11, lead + (N,), 0.5) if name == "trap" else _lif_hidden(lead)


@functools.cache
def _grads(name: str, algorithm=None, window=None):
    """(learner's summed gradient, BPTT's) for one sample (D-RTRL by default)."""
    algorithm = bt.D_RTRL() if algorithm is None else algorithm
    step, names, kind = MODELS[name]
    params, hidden, xs = _params(names), _hidden_for(name), _inputs(kind)
    targets = _normal(22, (T, N))
    learner = bt.compile(step, mse, algorithm, batched=False)
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    state = learner.init(params, hidden, x0)
    kwargs = {} if window is None else {"window": window}
    _, grads, _ = jax.jit(functools.partial(learner.scan, **kwargs))(params, state, xs, targets)
    return _flat(grads), _flat(bptt_grad(step, mse, params, hidden, xs, targets, False))


@pytest.mark.parametrize(
    "name",
    [
        "reset",
        pytest.param("switch", marks=_SLOW),  # per sample in the batched test
        pytest.param("nested", marks=_SLOW),
        "trap",
        "fori",
        "scan",
    ],
)
def test_exact_class_equals_bptt(name):
    """D-RTRL; RTRL and SnAp-1 agree with it in the exact class (``-m slow``)."""
    got, want = _grads(name)
    assert set(got) == set(want)
    for path in want:
        assert np.all(np.isfinite(got[path])), path
        assert np.abs(want[path]).max() > 1e-6, path  # the oracle is not trivially zero
        assert _rel(got[path], want[path]) < EXACT, (name, path, _rel(got[path], want[path]))


def test_report_lists_each_construct():
    rows = {}
    for name in ("reset", "fori", "scan"):
        step, names, kind = MODELS[name]
        x0 = jax.tree_util.tree_map(lambda a: a[0], _inputs(kind))
        report = bt.compile_graph(step, _params(names), _lif_hidden(), x0).report
        rows[name] = report.control_flow
        assert all(e.gradient == "exact" for e in report.params), name
        assert "control flow" in str(report)
    assert [r[:2] for r in rows["reset"]] == [("cond #0 (2 branches)", "inlined")]
    assert [r[:2] for r in rows["fori"]] == [("scan of length 4 #0", "composed")]
    assert "1 ETP op(s) moved before it" in rows["fori"][0][2]
    assert [r[:2] for r in rows["scan"]] == [("scan of length 4 #0", "unrolled")]


def _where_batched_reset(p, h, x):
    """The reset written for a batch: a per-sample ``cond`` under ``vmap``."""
    xin, flag = x
    reset = jax.vmap(
        lambda f, v, i: lax.cond(f > 0, lambda v, i: (0.0 * v, 0.0 * i), lambda v, i: (v, i), v, i)
    )
    v, i = reset(flag, h["v"], h["i"])
    v, i = _lif(v, i, ops.dense(xin, p["w"], p["b"]))
    return {"v": v, "i": i}, v


def test_batched_reset_and_per_sample_switch_equal_bptt():
    """Batched: a vmapped cond in a batched step, and a per-sample learner under vmap."""
    params, hidden = _params(("w", "b")), _lif_hidden((B,))
    xs, targets = _inputs("flag", (B,)), _normal(22, (T, B, N))
    learner = bt.compile(_where_batched_reset, mse, bt.D_RTRL(), batched=True)
    state = learner.init(params, hidden, jax.tree_util.tree_map(lambda a: a[0], xs))
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    want = bptt_grad(_where_batched_reset, mse, params, hidden, xs, targets, True)
    for path, value in _flat(want).items():
        assert _rel(_flat(grads)[path], value) < EXACT, path

    params = _params(("w0", "w1"))
    xs = _inputs("index", (B,))
    learner = bt.compile(switch_step, mse, bt.D_RTRL(), batched=False)
    x0 = jax.tree_util.tree_map(lambda a: a[0, 0], xs)
    per_sample = jax.vmap(
        lambda h, x, y: learner.scan(params, learner.init(params, h, x0), x, y)[1],
        in_axes=(0, 1, 1),
    )
    got = jax.jit(per_sample)(hidden, xs, targets)
    want = jax.vmap(
        lambda h, x, y: bptt_grad(switch_step, mse, params, h, x, y, False), in_axes=(0, 1, 1)
    )(hidden, xs, targets)
    for path, value in _flat(want).items():
        assert _rel(_flat(got)[path], value) < EXACT, path


def _approx_step(p, h, x):
    """A recurrent (approximate-class) cell with a reset cond and two sub-steps."""
    xin, flag = x
    h = lax.cond(flag > 0, jnp.zeros_like, lambda h: h, h)

    def body(_, h):
        return jnp.tanh(ops.dense(h, p["wh"]) + ops.dense(xin, p["wx"]))

    h = lax.fori_loop(0, 2, body, h)
    return h, h


@pytest.mark.parametrize(
    "algorithm",
    [
        bt.D_RTRL(),
        pytest.param(bt.ES_D_RTRL(), marks=_SLOW),
        pytest.param(bt.SnAp1(), marks=_SLOW),
        pytest.param(bt.RTRL(), marks=_SLOW),
        pytest.param(bt.UORO(), marks=_SLOW),
        pytest.param(bt.OneStep(), marks=_SLOW),
        pytest.param(bt.BPTT(), marks=_SLOW),
    ],
    ids=repr,
)
def test_whole_sequence_window_equals_bptt(algorithm):
    params = {"wh": _normal(1, (N, N), 0.5), "wx": _normal(2, (N_IN, N))}
    hidden, xs, targets = _normal(11, (N,), 0.5), _inputs("flag"), _normal(22, (T, N))
    learner = bt.compile(_approx_step, mse, algorithm, batched=False)
    x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
    state = learner.init(params, hidden, x0, key=jax.random.PRNGKey(0))
    run = jax.jit(functools.partial(learner.scan, window=T))
    _, grads, _ = run(params, state, xs, targets)
    want = bptt_grad(_approx_step, mse, params, hidden, xs, targets, False)
    for path, value in _flat(want).items():
        assert _rel(_flat(grads)[path], value) < EXACT, path


SUB_B, SUB_IN, SUB_N = 8, 64, 64


def _step_memory(n_sub: int) -> tuple:
    """``(temp, total)`` bytes of a compiled batched D-RTRL learner step (total: its
    arguments, outputs and temporaries: the state with its traces included)."""
    params = {"w": _normal(0, (SUB_IN, SUB_N), 0.2), "b": jnp.zeros(SUB_N)}
    hidden = {"v": jnp.zeros((SUB_B, SUB_N)), "i": jnp.zeros((SUB_B, SUB_N))}
    step = functools.partial(fori_step, n_sub=n_sub)
    learner = bt.compile(step, mse, bt.D_RTRL(), batched=True)
    x, y = jnp.ones((SUB_B, SUB_IN)), jnp.zeros((SUB_B, SUB_N))
    state = learner.init(params, hidden, x)
    stats = jax.jit(learner.step).lower(params, state, x, y).compile().memory_analysis()
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes
    return stats.temp_size_in_bytes, total + stats.temp_size_in_bytes


def test_sub_step_memory_grows_by_the_reverse_pass_only():
    """From 4 to 64 sub-steps a learner step's memory (state and traces included) at
    most doubles; its temporaries grow by at most one carry-sized residual per
    sub-step (what the reverse pass through the loop keeps), where a trace-sized
    array per sub-step (here 16x the carry) would be far over."""
    (temp_4, total_4), (temp_64, total_64) = _step_memory(4), _step_memory(64)
    carry = 2 * SUB_B * SUB_N * 8
    trace = SUB_B * SUB_IN * SUB_N * 2 * 8
    assert total_64 <= 2 * total_4, (total_4, total_64)
    assert temp_64 - temp_4 <= 60 * carry, (temp_4, temp_64, carry)
    assert 60 * carry < 0.2 * 60 * trace  # the bound would catch per-sub-step traces


@pytest.mark.slow
def test_long_sub_step_loop_is_exact():
    step = functools.partial(fori_step, n_sub=24)
    params, hidden, xs = _params(("w", "b")), _lif_hidden(), _inputs("plain")
    targets = _normal(22, (T, N))
    learner = bt.compile(step, mse, bt.D_RTRL(), batched=False)
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    for path, value in _flat(bptt_grad(step, mse, params, hidden, xs, targets, False)).items():
        assert _rel(_flat(grads)[path], value) < EXACT, path


def _while_step(p, h, x):
    h = lax.while_loop(lambda s: s[1] < 3, lambda s: (0.9 * s[0], s[1] + 1), (h, 0))[0]
    h = h + ops.dense(x, p["w"])
    return h, h


def _while_const_step(p, h, x):
    gain = lax.while_loop(lambda g: g < 0.5, lambda g: g * 1.5, jnp.asarray(0.1))
    h = gain * h + ops.dense(x, p["w"])
    return h, h


def test_while_loop_on_the_state_is_refused_and_one_over_constants_trains():
    params, hidden, xs = {"w": _normal(0, (N_IN, N))}, _normal(11, (N,), 0.5), _inputs("plain")
    with pytest.raises(bt.CompileError, match=r"while loop #0 carries hidden"):
        bt.compile_graph(_while_step, params, hidden, xs[0])
    report = bt.compile_graph(_while_const_step, params, hidden, xs[0]).report
    assert [r[:2] for r in report.control_flow] == [("while loop #0", "opaque")]
    targets = _normal(22, (T, N))
    learner = bt.compile(_while_const_step, mse, bt.D_RTRL(), batched=False)
    _, grads, _ = jax.jit(learner.scan)(params, learner.init(params, hidden, xs[0]), xs, targets)
    want = bptt_grad(_while_const_step, mse, params, hidden, xs, targets, False)
    assert _rel(grads["w"], want["w"]) < EXACT


def test_long_loop_with_a_changing_op_input_is_refused():
    def step(p, h, x):
        def body(s, xk):
            return 0.9 * s + ops.dense(xk, p["w"]), None

        return lax.scan(body, h, x)[0], h

    x = jnp.ones((32, N_IN))
    with pytest.raises(bt.CompileError, match=r"scan of length 32 holds the ETP op\(s\) etp_mv"):
        bt.compile_graph(step, {"w": jnp.ones((N_IN, N))}, jnp.zeros(N), x)


def test_the_trap_is_real_for_a_plain_where():
    """Negative control: the trap model written with ``jnp.where`` (both sides computed
    and differentiated) has a NaN BPTT gradient; the ``cond`` version trains finite."""

    def where_step(p, h, x):
        xin, flag = x
        risky = 0.9 * h + ops.dense(jnp.log(xin), p["w0"]) + jnp.sqrt(xin).sum()
        safe = 0.9 * h + ops.dense(xin, p["w1"])
        v = jnp.where(flag > 0, risky, safe)
        return v, v

    params, hidden, xs = _params(("w0", "w1")), _hidden_for("trap"), _inputs("trap")
    grads = bptt_grad(where_step, mse, params, hidden, xs, _normal(22, (T, N)), False)
    assert not np.all(np.isfinite(grads["w0"]))
    got, _ = _grads("trap")
    assert all(np.all(np.isfinite(v)) for v in got.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reset", "switch", "nested", "trap", "fori", "scan"])
@pytest.mark.parametrize("algorithm", [bt.RTRL(), bt.SnAp1()], ids=repr)
def test_rtrl_and_snap1_through_control_flow_equal_bptt(name, algorithm):
    got, want = _grads(name, algorithm)
    for path in want:
        assert _rel(got[path], want[path]) < EXACT, (name, path)
