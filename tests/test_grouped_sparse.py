"""Grouped and sparse dense ops (``ops.grouped_dense``, ``ops.sparse_dense``) against oracles.

- outputs: equal to a matmul with the dense weight built here by loops (block-diagonal
  for grouped, scattered COO values for sparse);
- exact class: both ops drive a LIF membrane directly (no recurrent op); D-RTRL's summed
  gradient equals BPTT's (``jax.grad`` through ``lax.scan``, float64, 1e-10), batched
  and unbatched; pp_prop equals D-RTRL at ``T = 1`` and, on a ``D = 0`` model, with
  ``alpha = 0`` at ``T > 1`` (which runs its ``xy_to_dw`` credit);
- recurrent use (block-diagonal / sparse recurrence): D-RTRL's gradient equals, entry by
  entry, dense D-RTRL's on the same (masked) weight, a closed-form cross check, and is
  off BPTT (negative control: the recurrent class is approximate);
- trace memory: the sparse op's D-RTRL trace is ``nnz x S`` per sample;
- bad input: errors name the op and the fault.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace as bt
from braintrace import ops
from braintrace.ops import sparse as sparse_module
from braintrace.surrogate import spike
from braintrace.testing.reference import bptt_grad

N_IN, N, G, T, B = 4, 6, 2, 5, 3
RTOL = 1e-10
# A fixed pattern: 11 of the 24 (in, out) entries, (1, 4) listed twice (they add up).
INDICES = np.array(
    [[0, 0], [0, 3], [1, 1], [1, 4], [2, 2], [2, 5], [3, 0], [3, 5], [1, 4], [0, 2], [3, 3]]
)
NNZ = len(INDICES)


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64) * scale


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- outputs against a dense matmul --------------------------------------------------------


def _block_diag_by_loops(w):
    groups, gi, go = w.shape
    full = np.zeros((groups * gi, groups * go))
    for g in range(groups):
        full[g * gi : (g + 1) * gi, g * go : (g + 1) * go] = w[g]
    return full


def _scatter_by_loops(values, shape):
    full = np.zeros(shape)
    for (i, k), v in zip(INDICES, np.asarray(values)):
        full[i, k] += v
    return full


def test_outputs_equal_a_dense_matmul_batched_and_not():
    w, b = _normal(0, (G, N_IN // G, N // G)), _normal(1, (N,))
    vals = _normal(2, (NNZ,))
    x = _normal(3, (B, N_IN))
    bd = _block_diag_by_loops(np.asarray(w))
    sc = _scatter_by_loops(vals, (N_IN, N))

    @jax.jit
    def outputs(xs):
        w_out_in = jnp.swapaxes(w, 1, 2)  # Equinox's (G, out // G, in // G) blocks
        return (
            ops.grouped_dense(xs, w, b),
            ops.grouped_dense(xs, w_out_in, b, weight_layout="out_in"),
            ops.sparse_dense(xs, vals, INDICES, (N_IN, N)),
        )

    for xs in (x, x[0]):
        grouped, grouped_out_in, sparse = outputs(xs)
        np.testing.assert_allclose(grouped, xs @ bd + b, rtol=1e-13)
        np.testing.assert_allclose(grouped_out_in, xs @ bd + b, rtol=1e-13)
        np.testing.assert_allclose(sparse, xs @ sc, rtol=1e-13)
    assert np.abs(sc).sum() > 0 and np.count_nonzero(bd) == w.size  # the oracle is not empty


def test_sparse_scatter_forward_path_and_its_vjp_match_the_closed_form(monkeypatch):
    """The gather / scatter-add path (for patterns sparser than 1/32; the tests' patterns
    are denser and take the matmul path everywhere else)."""
    monkeypatch.setattr(sparse_module, "DENSE_RATIO", 0)
    vals, x, ct = _normal(2, (NNZ,)), _normal(3, (B, N_IN)), _normal(4, (B, N))
    sc = _scatter_by_loops(vals, (N_IN, N))

    @jax.jit
    def forward_and_vjp(x, vals, ct):
        y, vjp = jax.vjp(lambda x, v: ops.sparse_dense(x, v, INDICES, (N_IN, N)), x, vals)
        return y, *vjp(ct)

    y, dx, dvals = forward_and_vjp(x, vals, ct)
    np.testing.assert_allclose(y, x @ sc, rtol=1e-13)
    np.testing.assert_allclose(dx, ct @ sc.T, rtol=1e-13)
    want = [float((x[:, i] * ct[:, k]).sum()) for i, k in INDICES]
    np.testing.assert_allclose(dvals, want, rtol=1e-13)
    pattern = ops.SparsePattern.from_indices(INDICES, (N_IN, N))
    for ratio in (0, 32):  # the xy_to_dw rule on both paths (gathers; the outer product)
        monkeypatch.setattr(sparse_module, "DENSE_RATIO", ratio)
        rule = sparse_module.sparse_xy_to_dw(
            x, ct, {"values": vals}, pattern=pattern, has_bias=False
        )
        np.testing.assert_allclose(rule["values"], want, rtol=1e-13)


# -- exact class: the ops drive a LIF membrane directly ------------------------------------


def _lif(h, y, tau):
    i = 0.8 * h["i"] + y
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    return {"i": i, "v": v}


def lif_step(p, h, x):
    y = ops.grouped_dense(x, p["wg"], p["bg"])
    y = y + ops.sparse_dense(x, p["vals"], INDICES, (N_IN, N), p["bs"])
    new = _lif(h, y, ops.elemwise(p["tau"], jax.nn.sigmoid))
    return new, jnp.tanh(new["v"]) @ p["ro"]


def _lif_params():
    return {
        "wg": _normal(4, (G, N_IN // G, N // G), 1.2),
        "bg": jnp.full((N,), 0.3),
        "vals": _normal(5, (NNZ,), 1.2),
        "bs": _normal(6, (N,), 0.2),
        "tau": jnp.linspace(-1.0, 1.5, N),
        "ro": _normal(7, (N, 2)),
    }


def _problem(batched, steps=T):
    lead = (B,) if batched else ()
    hidden = {"i": _normal(8, lead + (N,), 0.5), "v": _normal(9, lead + (N,), 0.5)}
    xs = _normal(10, (steps,) + lead + (N_IN,), 1.5)
    return hidden, xs, _normal(11, (steps,) + lead + (2,))


def _grads(step, params, algorithm, batched, hidden, xs, targets):
    learner = bt.compile(step, mse, algorithm, batched=batched)
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = learner.scan(params, state, xs, targets)
    return learner, grads


@pytest.mark.parametrize("batched", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_exact_class_d_rtrl_equals_bptt(batched):
    params = _lif_params()
    hidden, xs, targets = _problem(batched)
    learner, grads = _grads(lif_step, params, bt.D_RTRL(), batched, hidden, xs, targets)
    report = learner.report(params, hidden, xs[0])
    assert {e.path: e.gradient for e in report.params} == {f"['{k}']": "exact" for k in params}, (
        report
    )
    bptt = bptt_grad(lif_step, mse, params, hidden, xs, targets, batched)
    for k in params:
        assert _rel(grads[k], bptt[k]) < RTOL, (k, _rel(grads[k], bptt[k]))
    if batched:  # negative control (slow run only): without traces the check fails
        one_step = _grads(lif_step, params, bt.OneStep(), batched, hidden, xs, targets)[1]
        assert _rel(one_step["vals"], bptt["vals"]) > 1e-2
        assert _rel(one_step["wg"], bptt["wg"]) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True])
def test_pp_prop_at_t1_equals_d_rtrl(batched):
    params = _lif_params()
    hidden, xs, targets = _problem(batched, steps=1)
    d1 = _grads(lif_step, params, bt.D_RTRL(), batched, hidden, xs, targets)[1]
    p1 = _grads(lif_step, params, bt.pp_prop(0.6), batched, hidden, xs, targets)[1]
    for k in params:
        assert _rel(p1[k], d1[k]) < RTOL, k


def tanh_step(p, h, x):
    """``D = 0``: the new state reads no old state, so pp_prop with ``alpha = 0`` is exact."""
    y = ops.grouped_dense(x, p["wg"], p["bg"])
    y = y + ops.sparse_dense(x, p["vals"], INDICES, (N_IN, N), p["bs"])
    new = jnp.tanh(y + 0.0 * h)
    return new, new @ p["ro"]


@pytest.mark.slow  # by default, test_grouped_sparse_faces.py runs this check through NNX
def test_pp_prop_alpha_zero_equals_d_rtrl_and_bptt_when_d_is_zero():
    params = {k: v for k, v in _lif_params().items() if k != "tau"}
    hidden, xs, targets = _problem(batched=True, steps=4)
    hidden = hidden["v"]
    pp = _grads(tanh_step, params, bt.pp_prop(0.0), True, hidden, xs, targets)[1]
    bptt = bptt_grad(tanh_step, mse, params, hidden, xs, targets, batched=True)
    for k in params:
        assert _rel(pp[k], bptt[k]) < RTOL, (k, _rel(pp[k], bptt[k]))


# -- recurrent use: block-diagonal / sparse recurrence -------------------------------------


def _rnn(rec, p, h, x):
    new = 0.6 * h + jnp.tanh(rec(h, p) + ops.dense(x, p["w_in"]))
    return new, new @ p["ro"]


def _rnn_steps():
    """Grouped, sparse and the two dense twins (same recurrent weight, masked)."""
    return {
        "grouped": lambda p, h, x: _rnn(lambda h, p: ops.grouped_dense(h, p["rec"]), p, h, x),
        "sparse": lambda p, h, x: _rnn(
            lambda h, p: ops.sparse_dense(h, p["rec"], SQUARE, (N, N)), p, h, x
        ),
        "dense": lambda p, h, x: _rnn(lambda h, p: ops.dense(h, p["rec"]), p, h, x),
    }


SQUARE = np.array([[i, (3 * i + j) % N] for i in range(N) for j in (0, 2)] + [[5, 5]])


def _rnn_params(rec):
    return {"rec": rec, "w_in": _normal(12, (N_IN, N)), "ro": _normal(13, (N, 2))}


def _dense_twin(name, rec):
    """The dense recurrent weight with the same values (zero off the blocks / pattern)."""
    if name == "grouped":
        return _block_diag_by_loops(np.asarray(rec))
    full = np.zeros((N, N))
    for (i, k), v in zip(SQUARE, np.asarray(rec)):
        full[i, k] += v
    return full


@functools.cache
def _rnn_case(name, algorithm_name):
    """(the op's gradient, dense twin's gradient, BPTT) for one algorithm."""
    steps = _rnn_steps()
    algorithm = {"d_rtrl": bt.D_RTRL, "snap": bt.SnAp1}[algorithm_name]()
    rec = {
        "grouped": _normal(14, (G, N // G, N // G), 0.6),
        "sparse": _normal(15, (len(SQUARE),), 0.6),
    }[name]
    hidden, xs, targets = _problem(batched=False)
    hidden = hidden["v"]
    out = {}
    for key, rec_value in ((name, rec), ("dense", jnp.asarray(_dense_twin(name, rec)))):
        out[key] = _grads(
            steps[key], _rnn_params(rec_value), algorithm, False, hidden, xs, targets
        )[1]
    bptt = bptt_grad(steps[name], mse, _rnn_params(rec), hidden, xs, targets)
    return out[name], out["dense"], bptt


def _on_pattern(name, dense_grad):
    g = np.asarray(dense_grad)
    if name == "grouped":
        gi = N // G
        return np.stack([g[k * gi : (k + 1) * gi, k * gi : (k + 1) * gi] for k in range(G)])
    return g[SQUARE[:, 0], SQUARE[:, 1]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grouped", "sparse"])
def test_recurrent_use_matches_dense_d_rtrl_on_the_masked_weight(name):
    got, dense, bptt = _rnn_case(name, "d_rtrl")
    assert np.isfinite(np.asarray(got["rec"])).all()
    expected = _on_pattern(name, dense["rec"])
    assert _rel(got["rec"], expected) < RTOL
    assert _rel(got["w_in"], dense["w_in"]) < RTOL
    assert _rel(got["rec"], bptt["rec"]) > 1e-4  # approximate class: not BPTT


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grouped", "sparse"])
def test_snap1_reads_the_ops_own_recurrent_entries(name):
    got, dense, bptt = _rnn_case(name, "snap")
    assert _rel(got["rec"], _on_pattern(name, dense["rec"])) < RTOL
    d_rtrl = _rnn_case(name, "d_rtrl")[0]
    assert _rel(got["rec"], d_rtrl["rec"]) > 1e-6  # SnAp-1 adds the self-loop entries


# -- trace memory ----------------------------------------------------------------------------


def sparse_only_step(p, h, x):
    new = 0.9 * h + ops.sparse_dense(x, p["vals"], INDICES, (N_IN, N))
    return new, new


@pytest.mark.parametrize("batched", [False, True])
def test_sparse_d_rtrl_trace_memory_is_nnz_times_states(batched):
    params = {"vals": _normal(5, (NNZ,))}
    lead = (B,) if batched else ()
    h, x = jnp.zeros(lead + (N,)), jnp.zeros(lead + (N_IN,))
    per_sample = {}
    for algorithm in (bt.D_RTRL(), bt.pp_prop(0.5)):
        report = bt.compile(sparse_only_step, mse, algorithm, batched=batched).report(params, h, x)
        per_sample[algorithm.name] = dict(report.trace_memory)[algorithm.name]
    states, itemsize = 1, 8
    d_rtrl = per_sample[bt.D_RTRL().name]
    assert abs(d_rtrl - NNZ * states * itemsize) <= 0.1 * NNZ * states * itemsize, per_sample
    assert d_rtrl < N_IN * N * states * itemsize  # not the dense weight's size
    assert per_sample[bt.pp_prop(0.5).name] == (N_IN + N * states) * itemsize


# -- bad input ---------------------------------------------------------------------------------


def test_errors_name_the_op_and_the_fault():
    x = jnp.ones(N_IN)
    with pytest.raises(ValueError, match=r"sparse_dense: indices\[2\] = \(1, 9\) is out of range"):
        ops.sparse_dense(x, jnp.ones(3), [[0, 0], [1, 1], [1, 9]], (N_IN, N))
    with pytest.raises(ValueError, match=r"sparse_dense: indices\[0\] = \(-1, 0\)"):
        ops.sparse_dense(x, jnp.ones(1), [[-1, 0]], (N_IN, N))
    with pytest.raises(TypeError, match="sparse_dense: indices must be integers"):
        ops.sparse_dense(x, jnp.ones(1), [[0.0, 1.0]], (N_IN, N))
    with pytest.raises(ValueError, match=r"sparse_dense: values must have shape \(2,\)"):
        ops.sparse_dense(x, jnp.ones(3), [[0, 0], [1, 1]], (N_IN, N))
    with pytest.raises(TypeError, match="sparse_dense: indices must be static"):
        jax.jit(lambda i: ops.sparse_dense(x, jnp.ones(1), i, (N_IN, N)))(jnp.zeros((1, 2), int))
    with pytest.raises(ValueError, match=r"grouped_dense: x's last axis \(5\) must equal"):
        ops.grouped_dense(jnp.ones(5), jnp.ones((G, 2, 3)))
    with pytest.raises(ValueError, match=r"grouped_dense: weight must be 3-D"):
        ops.grouped_dense(x, jnp.ones((N_IN, N)))
    with pytest.raises(ValueError, match=r"grouped_dense: bias must have shape \(6,\)"):
        ops.grouped_dense(x, jnp.ones((G, 2, 3)), jnp.ones(4))
