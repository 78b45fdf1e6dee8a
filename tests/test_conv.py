"""The convolution op (``braintrace.ops.conv``) against independent oracles.

- its output is ``lax.conv_general_dilated``'s (strides, paddings, dilation, groups);
- exact class: a conv (stride 2, ``SAME``, two input channels) drives a LIF membrane
  directly (no recurrent op); D-RTRL's summed gradient equals BPTT's (``jax.grad``
  through ``lax.scan``, float64, 1e-10), batched and unbatched, and pp_prop at
  ``T = 1`` equals D-RTRL; a kernel-shaped (position-summed) trace would not be exact,
  which the negative control shows;
- pp_prop equals a per-sample NumPy loop over ``docs/algorithms.md``'s "Convolution"
  formulas (patches written out by hand, ``D`` and ``D_f`` in closed form);
- a kernel whose input channels do not match ``x`` is refused by name.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import braintrace as bt
from braintrace import ops, registry
from braintrace.contract import RULE_SLOTS
from braintrace.ops.conv import conv_trace_sizes
from braintrace.surrogate import spike
from braintrace.testing.reference import bptt_grad, one_step_grad
from oracles import rel_err

T, B = 5, 2
SPATIAL, C_IN, C_OUT, WINDOW, STRIDE = (6, 6), 2, 3, (3, 3), 2
OUT_SPATIAL = (3, 3)  # SAME with stride 2: ceil(6 / 2)
N_OUT = 2


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64) * scale


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _readout(v, ro):
    flat = v.reshape(v.shape[: v.ndim - 3] + (-1,))
    return jnp.tanh(flat) @ ro


def lif_step(p, h, x):
    """Conv into a current-then-voltage LIF membrane with a surrogate spike reset."""
    y = ops.conv(x, p["kernel"], p["bias"], strides=STRIDE, padding="SAME")
    i = 0.7 * h["i"] + y
    v = 0.8 * h["v"] * (1.0 - spike(h["v"] - 1.0)) + 0.2 * i
    return {"i": i, "v": v}, _readout(v, p["ro"])


def _params(seed=0):
    return {
        "kernel": _normal(seed, WINDOW + (C_IN, C_OUT), 0.8),
        "bias": jnp.linspace(-0.3, 0.4, C_OUT),
        "ro": _normal(seed + 1, (math.prod(OUT_SPATIAL) * C_OUT, N_OUT), 0.4),
    }


def _problem(batched, steps=T, seed=0):
    lead = (B,) if batched else ()
    hidden = {
        k: _normal(seed + 2 + j, lead + OUT_SPATIAL + (C_OUT,), 0.6) for j, k in enumerate("iv")
    }
    xs = _normal(seed + 4, (steps,) + lead + SPATIAL + (C_IN,), 1.5)
    targets = _normal(seed + 5, (steps,) + lead + (N_OUT,))
    return _params(seed), hidden, xs, targets


def _learner_grads(step, algorithm, batched, params, hidden, xs, targets):
    learner = bt.compile(step, mse, algorithm, batched=batched)
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    return learner, grads


# -- the op itself --------------------------------------------------------------------------

CASES = {  # name: (x shape, kernel shape, keyword arguments)
    "2d-stride2-same": ((2, 7, 6, 2), (3, 3, 2, 4), dict(strides=2, padding="SAME")),
    "1d-groups-dilated": (
        (2, 9, 4),
        (3, 2, 6),
        dict(padding=((2, 1),), rhs_dilation=2, feature_group_count=2),
    ),
    "3d-valid": ((1, 4, 5, 4, 1), (2, 3, 2, 1, 2), dict(strides=(1, 2, 1), padding="VALID")),
    "2d-channels-first-groups": (
        (2, 4, 7, 6),
        (6, 2, 3, 2),
        dict(strides=(2, 1), padding="SAME", feature_group_count=2, layout="channels_first"),
    ),
}


def _lax_conv(
    x,
    kernel,
    bias,
    strides=1,
    padding="SAME",
    rhs_dilation=1,
    feature_group_count=1,
    layout="channels_last",
):
    n = kernel.ndim - 2
    spec = "".join("DHW"[3 - n :])
    specs = (f"N{spec}C", f"{spec}IO", f"N{spec}C")
    if layout == "channels_first":
        specs = (f"NC{spec}", f"OI{spec}", f"NC{spec}")
        bias = bias.reshape(bias.shape + (1,) * n)
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, specs)
    as_tuple = lambda v: (v,) * n if isinstance(v, int) else v
    y = lax.conv_general_dilated(
        x,
        kernel,
        as_tuple(strides),
        padding,
        rhs_dilation=as_tuple(rhs_dilation),
        dimension_numbers=numbers,
        feature_group_count=feature_group_count,
    )
    return y + bias


#: With ``-m slow`` (the faces' bit-identity tests compare the op with the stock layers'
#: ``lax.conv_general_dilated`` in the default suite).
CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_output_equals_lax_conv_batched_unbatched_and_vmapped(case):
    x_shape, k_shape, kw = CASES[case]
    x, kernel = _normal(1, x_shape), _normal(2, k_shape)
    bias = _normal(3, (k_shape[0 if kw.get("layout") == "channels_first" else -1],))
    expected = _lax_conv(x, kernel, bias, **kw)
    if kw.get("layout") == "channels_first":
        bias = bias.reshape(bias.shape + (1,) * (kernel.ndim - 2))
    np.testing.assert_array_equal(ops.conv(x, kernel, bias, **kw), expected)
    np.testing.assert_array_equal(ops.conv(x[0], kernel, bias, **kw), expected[0])
    mapped = jax.vmap(lambda xi: ops.conv(xi, kernel, bias, **kw))
    np.testing.assert_allclose(mapped(x), expected, rtol=1e-13, atol=1e-13)
    names = [e.primitive.name for e in jax.make_jaxpr(mapped)(x).eqns]
    batched = "etp_conv_cf_batched" if kw.get("layout") else "etp_conv_batched"
    assert names == [batched]  # the unbatched op stays an ETP op under vmap


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_rules_against_autodiff(case):
    """``xy_to_dw`` is the VJP; ``trace_to_dw(yw_to_w(g, xy_to_trace(x, 1)))`` is it too."""
    x_shape, k_shape, kw = CASES[case]
    first = kw.get("layout") == "channels_first"
    x, kernel = _normal(1, x_shape), _normal(2, k_shape)
    bias = _normal(3, (k_shape[0],) + (1,) * (len(k_shape) - 2) if first else (k_shape[-1],))
    cot = _normal(4, ops.conv(x, kernel, bias, **kw).shape)
    eqn = jax.make_jaxpr(lambda x, k, b: ops.conv(x, k, b, **kw))(x, kernel, bias).eqns[-1]
    rules = {s: registry.get_rule(eqn.primitive, s) for s in RULE_SLOTS[:6]}
    _, vjp = jax.vjp(lambda k, b: _lax_conv(x, k, b.reshape(-1), **kw), kernel, bias)
    dk, db = vjp(cot)
    w = {"kernel": kernel, "bias": bias}
    dw = rules["xy_to_dw"](x, cot, w, **eqn.params)
    assert rel_err(dw["kernel"], dk) < 1e-12 and rel_err(dw["bias"], db) < 1e-12
    # The unshared trace route: per-sample blocks at D_f = 1, scaled by g, summed back.
    per_sample = [
        rules["xy_to_trace"](x[b : b + 1], jnp.ones_like(cot[b : b + 1]), w, **eqn.params)
        for b in range(x.shape[0])
    ]
    scaled = [
        rules["yw_to_w"](cot[b : b + 1], jax.tree.map(lambda t: t[None], tr), **eqn.params)
        for b, tr in enumerate(per_sample)
    ]
    total = jax.tree.map(lambda *ts: sum(t[0] for t in ts), *scaled)
    back = rules["trace_to_dw"](total, w, **eqn.params)
    assert rel_err(back["kernel"], dk) < 1e-12 and rel_err(back["bias"], db) < 1e-12


def test_bad_kernel_and_padding_are_refused_by_name():
    x = jnp.ones((2, 6, 6, 2))
    with pytest.raises(
        ValueError, match=r"braintrace\.ops\.conv: the kernel's input-channel axis.* must be 2"
    ):
        ops.conv(x, jnp.ones((3, 3, 3, 4)))
    with pytest.raises(ValueError, match=r"braintrace\.ops\.conv: feature_group_count"):
        ops.conv(x, jnp.ones((3, 3, 1, 3)), feature_group_count=2)
    with pytest.raises(ValueError, match=r"braintrace\.ops\.conv: padding .*mode='wrap'"):
        ops.conv(x, jnp.ones((3, 3, 2, 4)), padding="CIRCULAR")
    with pytest.raises(ValueError, match=r"braintrace\.ops\.conv: x must be"):
        ops.conv(jnp.ones((6, 2)), jnp.ones((3, 3, 2, 4)))
    with pytest.raises(TypeError, match=r"braintrace\.ops\.conv: x must have a floating dtype"):
        ops.conv(jnp.ones((6, 6, 2), jnp.int32), jnp.ones((3, 3, 2, 4)))


# -- exact class: D-RTRL equals BPTT ----------------------------------------------------------


@functools.cache
def _exact_run(batched):
    params, hidden, xs, targets = _problem(batched)
    learner, grads = _learner_grads(lif_step, bt.D_RTRL(), batched, params, hidden, xs, targets)
    report = learner.report(params, hidden, xs[0])
    bptt = bptt_grad(lif_step, mse, params, hidden, xs, targets, batched)
    return report, grads, bptt


@pytest.mark.parametrize(
    "batched", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["unbatched", "batched"]
)
def test_d_rtrl_equals_bptt(batched):
    report, grads, bptt = _exact_run(batched)
    assert {e.path: e.gradient for e in report.params} == {
        "['bias']": "exact",
        "['kernel']": "exact",
        "['ro']": "exact",
    }
    for name in ("kernel", "bias", "ro"):
        assert rel_err(grads[name], bptt[name]) <= 1e-10, name
    # The report's D-RTRL trace memory is the unshared trace (float64, S = 2 states).
    sizes = conv_trace_sizes(SPATIAL + (C_IN,), OUT_SPATIAL + (C_OUT,), WINDOW + (C_IN, C_OUT), 2)
    assert dict(report.trace_memory)["d_rtrl"] == 8 * sizes["d_rtrl"]


def test_the_traces_matter():
    """Negative control: the one-step gradient (no trace credit) is far from BPTT here."""
    params, hidden, xs, targets = _problem(False)
    _, _, bptt = _exact_run(False)
    truncated = one_step_grad(lif_step, mse, params, hidden, xs, targets)
    assert rel_err(truncated["kernel"], bptt["kernel"]) > 1e-2
    assert rel_err(truncated["bias"], bptt["bias"]) > 1e-2


@pytest.mark.slow
def test_pp_prop_at_t1_equals_d_rtrl():
    params, hidden, xs, targets = _problem(True, steps=1)
    _, d = _learner_grads(lif_step, bt.D_RTRL(), True, params, hidden, xs, targets)
    _, pp = _learner_grads(lif_step, bt.pp_prop(0.6), True, params, hidden, xs, targets)
    for name in ("kernel", "bias", "ro"):
        assert rel_err(pp[name], d[name]) <= 1e-12, name


# -- pp_prop against a per-sample NumPy loop ------------------------------------------------


def pp_step(p, h, x):
    """Two states per output element: ``i`` leaks, ``v`` reads this step's ``i``."""
    y = ops.conv(x, p["kernel"], p["bias"], strides=STRIDE, padding="SAME")
    i = 0.8 * h["i"] + y
    v = 0.9 * jnp.tanh(h["v"]) + 0.5 * jnp.tanh(i)
    return {"i": i, "v": v}, _readout(v, p["ro"])


def _np_patches(x, window, stride):
    """``(*out_spatial, *window, C_in)`` patches of one sample with SAME padding, by hand."""
    pads = []
    for n, k in zip(x.shape[:-1], window):
        out = -(-n // stride)
        total = max((out - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    padded = np.pad(x, pads + [(0, 0)])
    rows, cols = (-(-n // stride) for n in x.shape[:-1])
    patches = np.zeros((rows, cols) + tuple(window) + (x.shape[-1],))
    for r in range(rows):
        for c in range(cols):
            r0, c0 = r * stride, c * stride
            patches[r, c] = padded[r0 : r0 + window[0], c0 : c0 + window[1]]
    return patches


def oracle_pp_prop(params, hidden, xs, targets, alpha_x, alpha_f, *, credit=True):
    """pp_prop's ``sum_t G_t`` per sample, from ``docs/algorithms.md`` ("Convolution").

    ``dK[w, c, o] += sum_p patch(epsx)[p, w, c] * ghat[p, o]`` with
    ``ghat = sum_a g[p, o, a] epsf[p, o, a]``; the bias' input trace is a constant 1.
    """
    k, b, ro = (np.asarray(params[n]) for n in ("kernel", "bias", "ro"))
    i_h, v_h = np.array(hidden["i"]), np.array(hidden["v"])
    grads = {n: np.zeros_like(np.asarray(params[n])) for n in ("kernel", "bias", "ro")}
    epsx = np.zeros((B,) + SPATIAL + (C_IN,))
    epsx_bias = np.zeros(B)
    epsf = np.zeros((B,) + OUT_SPATIAL + (C_OUT, 2))
    sech2 = lambda z: 1.0 / np.cosh(z) ** 2
    for t in range(T):
        for s in range(B):
            x = np.asarray(xs[t, s])
            patches = _np_patches(x, WINDOW, STRIDE)
            y = np.einsum("pqwzc,wzco->pqo", patches, k) + b
            i = 0.8 * i_h[s] + y
            v = 0.9 * np.tanh(v_h[s]) + 0.5 * np.tanh(i)
            d = np.zeros(i.shape + (2, 2))
            d[..., 0, 0] = 0.8
            d[..., 1, 0] = 0.5 * sech2(i) * 0.8
            d[..., 1, 1] = 0.9 * sech2(v_h[s])
            df = np.stack([np.ones_like(i), 0.5 * sech2(i)], axis=-1)
            flat = np.tanh(v).reshape(-1)
            dl_dout = 2.0 * (flat @ ro - np.asarray(targets[t, s])) / B
            dl_dv = (ro @ dl_dout).reshape(v.shape) * sech2(v)
            dl_dh = np.stack([np.zeros_like(v), dl_dv], axis=-1)
            dl_dy = (dl_dh * df).sum(-1)  # the one-step reverse pass
            grads["kernel"] += np.einsum("pqwzc,pqo->wzco", patches, dl_dy)
            grads["bias"] += dl_dy.sum((0, 1))
            grads["ro"] += np.outer(flat, dl_dout)
            g = np.einsum("...a,...ac->...c", dl_dh, d)  # dl_t / dh^{t-1}
            ghat = (g * epsf[s]).sum(-1) if credit else np.zeros_like(y)
            eps_patches = _np_patches(epsx[s], WINDOW, STRIDE)
            grads["kernel"] += np.einsum("pqwzc,pqo->wzco", eps_patches, ghat)
            grads["bias"] += epsx_bias[s] * ghat.sum((0, 1))
            epsx[s] = alpha_x * epsx[s] + x
            epsx_bias[s] = alpha_x * epsx_bias[s] + 1.0
            epsf[s] = alpha_f * np.einsum("...ac,...c->...a", d, epsf[s]) + (1 - alpha_f) * df
            i_h[s], v_h[s] = i, v
    return grads


def test_pp_prop_equals_the_per_sample_oracle():
    params, hidden, xs, targets = _problem(True, seed=3)
    _, got = _learner_grads(pp_step, bt.pp_prop((0.5, 0.8)), True, params, hidden, xs, targets)
    expected = oracle_pp_prop(params, hidden, xs, targets, 0.5, 0.8)
    for name in ("kernel", "bias", "ro"):
        assert rel_err(np.asarray(got[name]), expected[name]) <= 1e-10, name
    # Negative controls: without the trace credit, or with the decays swapped, it is off.
    one_step = oracle_pp_prop(params, hidden, xs, targets, 0.5, 0.8, credit=False)
    swapped = oracle_pp_prop(params, hidden, xs, targets, 0.8, 0.5)
    for name in ("kernel", "bias"):
        assert rel_err(np.asarray(got[name]), one_step[name]) > 1e-2, name
        assert rel_err(np.asarray(got[name]), swapped[name]) > 1e-3, name


@pytest.mark.slow
def test_pp_prop_trace_memory_in_the_report():
    """pp_prop keeps the input and an output-sized trace per state (float64, S = 2)."""
    params, hidden, xs, _ = _problem(True, seed=3)
    learner = bt.compile(pp_step, mse, bt.pp_prop(0.5), batched=True)
    sizes = conv_trace_sizes(SPATIAL + (C_IN,), OUT_SPATIAL + (C_OUT,), WINDOW + (C_IN, C_OUT), 2)
    memory = dict(learner.report(params, hidden, xs[0]).trace_memory)
    assert memory == {"pp_prop": 8 * sizes["pp_prop"]}


@pytest.mark.slow
def test_snap1_runs_a_recurrent_conv_with_its_own_taps():
    """A 1-d conv RNN ``h' = tanh(conv(h, k) + x)``: SnAp-1 reads the recurrent kernel's
    own taps (``input_entries``), so it differs from D-RTRL, and its gradient is finite
    and closer to BPTT's (cosine)."""

    def step(p, h, x):  # h: (B, 6 positions, 1 channel)
        h = jnp.tanh(ops.conv(h, p["k"], padding="SAME") + x)
        return h, h

    k = jax.random.split(jax.random.PRNGKey(5), 3)
    params = {
        "k": 0.6 * jax.random.normal(k[0], (3, 1, 1), jnp.float64)
        + jnp.array([[[0.0]], [[0.9]], [[0.0]]])
    }
    hidden = 0.5 * jax.random.normal(k[1], (B, 6, 1), jnp.float64)
    xs = jax.random.normal(k[2], (T, B, 6, 1), jnp.float64)
    targets = jnp.zeros((T, B, 6, 1))
    grads = {
        algo: _learner_grads(step, algo, True, params, hidden, xs, targets)[1]["k"]
        for algo in (bt.SnAp1(), bt.D_RTRL())
    }
    snap, d_rtrl = grads.values()
    exact = bptt_grad(step, mse, params, hidden, xs, targets, True)["k"]
    assert np.all(np.isfinite(snap)) and rel_err(snap, d_rtrl) > 1e-3
    assert rel_err(snap, exact) < rel_err(d_rtrl, exact)
