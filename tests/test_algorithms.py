"""The online learner against independent oracles (BPTT by jax.grad in float64)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax import lax

import braintrace as bt
from braintrace.testing import models as M
from braintrace.testing.reference import alignment, bptt_grad, one_step_grad
from oracles import rel_err

T, B = 6, 3

EXACT_MODELS = {
    "lif": (M.lif_step, M.lif_params, ("i", "v")),
    "lora": (M.lif_lora_step, M.lora_params, ("i", "v")),
    "alif": (M.alif_step, M.lif_params, ("i", "v", "a")),
}
MODES = ("unbatched", "batched", "vmapped")


def _data(mode, hidden_names, seed=7, dtype=jnp.float64, t=T):
    lead = () if mode == "unbatched" else (B,)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    hidden = M.hidden_like(hidden_names, lead, dtype=dtype)
    xs = jax.random.normal(k1, (t,) + lead + (M.N_IN,), dtype)
    targets = jax.random.normal(k2, (t,) + lead + (2,), dtype)
    return hidden, xs, targets


def _step_for(step, mode):
    if mode == "vmapped":
        return jax.vmap(step, in_axes=(None, 0, 0))
    return step


def _run(step, algo, params, hidden, xs, targets, batched):
    learner = bt.compile(step, M.mse, algo, batched=batched)
    state = learner.init(params, hidden, xs[0])
    return jax.jit(learner.scan)(params, state, xs, targets)


def _steps_in_user_scan(learner, params, state, xs, targets):
    """Sum of ``learner.step``'s gradients, called from the caller's own ``lax.scan``."""

    def body(carry, inputs):
        st, acc = carry
        _, g, st = learner.step(params, st, *inputs)
        return (st, jax.tree_util.tree_map(jnp.add, acc, g)), None

    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    (_, summed), _ = jax.jit(lambda s: lax.scan(body, (s, zero), (xs, targets)))(state)
    return summed


# -- the exact class ---------------------------------------------------------------------


# One model and mode runs in the default suite (the other pairs with -m slow;
# test_exactness.py covers every model of the exact class, batched and not).
_FAST_EXACT = {("lif", "batched")}  # alif, lora: test_exactness.py; vmapped: test_index_maps


@pytest.mark.parametrize(
    "model, mode",
    [
        pytest.param(m, mode, marks=() if (m, mode) in _FAST_EXACT else (pytest.mark.slow,))
        for m in sorted(EXACT_MODELS)
        for mode in MODES
    ],
)
def test_drtrl_equals_bptt_in_exact_class(model, mode):
    step, make_params, names = EXACT_MODELS[model]
    step = _step_for(step, mode)
    batched = mode != "unbatched"
    params = make_params()
    hidden, xs, targets = _data(mode, names)
    (losses, outs), grads, state = _run(step, bt.D_RTRL(), params, hidden, xs, targets, batched)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, batched)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name
    assert losses.shape == (T,) and bool((state.count == T).all())


def test_bptt_learner_matches_jax_grad_and_one_step():
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names)
    _, grads, _ = _run(step, bt.BPTT(), params, hidden, xs, targets, True)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-12
    # BPTT's step is the one-step-truncated gradient.
    learner = bt.compile(step, M.mse, bt.BPTT(), batched=True)
    state = learner.init(params, hidden, xs[0])

    summed = _steps_in_user_scan(learner, params, state, xs, targets)
    truncated = one_step_grad(step, M.mse, params, hidden, xs, targets, True)
    for name in params:
        assert rel_err(summed[name], truncated[name]) <= 1e-12


# -- negative controls --------------------------------------------------------------------


class _ZeroD(bt.D_RTRL):
    """A deliberately wrong trace: the state Jacobian D replaced by zero."""

    def update(self, graph, param_leaves, traces, parts, count):
        parts = dataclasses.replace(parts, d=tuple(jnp.zeros_like(d) for d in parts.d))
        return super().update(graph, param_leaves, traces, parts, count)


def test_wrong_trace_fails_the_exact_check():
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names)
    _, grads, _ = _run(step, _ZeroD(), params, hidden, xs, targets, True)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    assert rel_err(grads["w"], reference["w"]) > 1e-3
    assert rel_err(grads["tau"], reference["tau"]) > 1e-3
    # The one-step gradient alone (no traces at all) also fails: the traces matter.
    truncated = one_step_grad(step, M.mse, params, hidden, xs, targets, True)
    assert rel_err(truncated["w"], reference["w"]) > 1e-3


# -- pp_prop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.6, 3, (0.3, 0.8)])
def test_pp_prop_with_warmup_equals_drtrl_for_two_steps(decay):
    """At T = 2 only eps^1 is used; with the warm-up correction pp_prop's is D-RTRL's."""
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names, t=2)
    algo = bt.pp_prop(decay, warmup_correction=True)
    _, pp, _ = _run(step, algo, params, hidden, xs, targets, True)
    _, dr, _ = _run(step, bt.D_RTRL(), params, hidden, xs, targets, True)
    for name in params:
        assert rel_err(pp[name], dr[name]) <= 1e-12, name


def test_pp_prop_equals_drtrl_at_one_step():
    step, make_params, names = EXACT_MODELS["alif"]
    params = make_params()
    hidden, xs, targets = _data("unbatched", names, t=1)
    _, pp, _ = _run(step, bt.pp_prop(0.9), params, hidden, xs, targets, False)
    _, dr, _ = _run(step, bt.D_RTRL(), params, hidden, xs, targets, False)
    for name in params:
        assert rel_err(pp[name], dr[name]) <= 1e-12


@pytest.mark.parametrize("batched", [False, True])
def test_pp_prop_decay_zero_equals_drtrl_when_d_is_zero(batched):
    params = M.rnn_params()
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    lead = (B,) if batched else ()
    hidden = jnp.zeros(lead + (M.N,))
    xs = jax.random.normal(k1, (T,) + lead + (M.N_IN,))
    targets = jax.random.normal(k2, (T,) + lead + (2,))
    _, pp, _ = _run(M.rnn_step, bt.pp_prop(0.0), params, hidden, xs, targets, batched)
    _, dr, _ = _run(M.rnn_step, bt.D_RTRL(), params, hidden, xs, targets, batched)
    for name in params:
        assert rel_err(pp[name], dr[name]) <= 1e-12
    # ...and with a non-zero decay it is a different (smoothed) estimate.
    _, smooth, _ = _run(M.rnn_step, bt.pp_prop(0.8), params, hidden, xs, targets, batched)
    assert rel_err(smooth["wx"], dr["wx"]) > 1e-3


def test_pp_prop_decay_parsing():
    assert bt.pp_prop is bt.ES_D_RTRL
    assert bt.ES_D_RTRL(3).alpha_x == 0.5
    algo = bt.ES_D_RTRL((0.2, 1))
    assert (algo.alpha_x, algo.alpha_f) == (0.2, 0.0)
    for bad, err in [
        (1.0, ValueError),
        (-0.1, ValueError),
        (0, ValueError),
        ("x", TypeError),
        ((0.1, 0.2, 0.3), ValueError),
        (True, TypeError),
    ]:
        with pytest.raises(err, match="ES_D_RTRL"):
            bt.ES_D_RTRL(bad)


# -- approximate class ------------------------------------------------------------------------

APPROX = {
    "rnn": (M.rnn_step, M.rnn_params, None),
    "gru": (M.gru_step, M.gru_params, None),
    "rlif": (M.rlif_step, M.rlif_params, ("i", "v")),
}
# Floors on the cosine to BPTT of the recurrent-side gradient (readout left out: it is
# exact for every algorithm and would flatter the joint figure). Measured values
# (T=50, B=8, n=32, seed 3) are printed by benchmarks/alignment.py; floors sit below.
FLOORS = {
    ("rnn", "d_rtrl"): 0.95,
    ("rnn", "pp_prop"): 0.85,
    ("gru", "d_rtrl"): 0.95,
    ("gru", "pp_prop"): 0.80,
    ("rlif", "d_rtrl"): 0.95,
    ("rlif", "pp_prop"): 0.85,
}


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(APPROX))
def test_approximate_class_alignment_floors(model):
    step, make_params, names = APPROX[model]
    n_in, n, t, b = 8, 32, 50, 8
    params = make_params(0, n_in, n)
    hidden = {k: jnp.zeros((b, n)) for k in names} if names else jnp.zeros((b, n))
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    xs = jax.random.normal(k1, (t, b, n_in))
    targets = jax.random.normal(k2, (t, b, 2))
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    for algo in (bt.D_RTRL(), bt.pp_prop(0.9)):
        _, grads, _ = _run(step, algo, params, hidden, xs, targets, True)
        stats = alignment(grads, reference, skip=("ro",))
        assert stats["cosine"] >= FLOORS[(model, algo.name)], (model, algo, stats)
        assert rel_err(grads["ro"], reference["ro"]) <= 1e-10  # readout: exact
        # Negative control: a random gradient of the same norm is far from BPTT.
        noise = jax.tree_util.tree_map(
            lambda a: jax.random.normal(jax.random.PRNGKey(0), a.shape, a.dtype), grads
        )
        assert alignment(noise, reference, skip=("ro",))["cosine"] < 0.5


# -- memory independent of T ------------------------------------------------------------------


def _temp_bytes(learner, params, hidden, t):
    xs = jnp.zeros((t, B, M.N_IN))
    targets = jnp.zeros((t, B, 2))
    state = learner.init(params, hidden, xs[0])
    compiled = jax.jit(learner.scan).lower(params, state, xs, targets).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_online_memory_does_not_grow_with_t():
    params = M.lif_params()
    hidden = M.hidden_like(("i", "v"), (B,))
    sizes = {}
    for algo in (bt.D_RTRL(), bt.pp_prop(0.9), bt.BPTT()):
        learner = bt.compile(M.lif_step, M.mse, algo, batched=True)
        sizes[algo.name] = [_temp_bytes(learner, params, hidden, t) for t in (100, 2000)]
    for name in ("d_rtrl", "pp_prop"):
        short, long = sizes[name]
        assert long <= 1.1 * short + 1024, (name, sizes)
    short, long = sizes["bptt"]
    assert long > 5 * short, sizes  # BPTT stores the whole sequence


@pytest.mark.parametrize("model", ["rnn", "gru", "lif"])
def test_traces_are_updated_in_place(model):
    """The compiled scan holds no second copy of the traces: XLA updates them in place.

    Before the credit was ordered ahead of the update, XLA copied them every step (this
    ratio was 1.16 for the GRU); before the LIF's states were written in order (``i``
    reads only its own trace, ``v`` reads both, so ``v`` is written first), it was
    1.29. What remains (about 0.3 at these small sizes) is the step's other buffers.
    """
    step, make_params, names = {
        "rnn": (M.rnn_step, M.rnn_params, None),
        "gru": (M.gru_step, M.gru_params, None),
        "lif": (M.rlif_step, M.rlif_params, ("i", "v")),
    }[model]
    params = make_params(0, 4, 64, dtype=jnp.float32)
    zeros = jnp.zeros((8, 64), jnp.float32)
    hidden = {k: zeros for k in names} if names else zeros
    xs = jnp.ones((5, 8, 4), jnp.float32)
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    state = learner.init(params, hidden, xs[0])
    trace_bytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(state.traces))
    compiled = jax.jit(learner.scan).lower(params, state, xs, jnp.ones((5, 8, 2))).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * trace_bytes


# -- transformations and errors ---------------------------------------------------------------


@pytest.mark.slow
def test_jit_equals_eager_and_step_inside_user_scan():
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names, t=3)
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    state = learner.init(params, hidden, xs[0])
    (l_e, _), g_e, s_e = learner.step(params, state, xs[0], targets[0])
    (l_j, _), g_j, s_j = jax.jit(learner.step)(params, state, xs[0], targets[0])
    assert jnp.allclose(l_e, l_j, rtol=1e-13)
    for name in params:
        assert jnp.allclose(g_e[name], g_j[name], rtol=1e-12, atol=1e-14)
    for a, b in zip(jax.tree_util.tree_leaves(s_e), jax.tree_util.tree_leaves(s_j)):
        assert jnp.allclose(a, b, rtol=1e-12, atol=1e-14)

    summed = _steps_in_user_scan(learner, params, state, xs, targets)
    _, scanned, _ = jax.jit(learner.scan)(params, state, xs, targets)
    for name in params:
        assert jnp.allclose(summed[name], scanned[name], rtol=1e-12, atol=1e-14)


def test_learner_step_is_vmappable_over_independent_sequences():
    """vmap an unbatched learner over sequences; equals the batched learner's per-sample sum."""
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names, t=4)
    single = bt.compile(step, M.mse, bt.D_RTRL(), batched=False)
    state = jax.vmap(single.init, in_axes=(None, 0, 0))(params, hidden, xs[0])
    run = jax.vmap(single.scan, in_axes=(None, 0, 1, 1))
    _, grads, _ = jax.jit(run)(params, state, xs, targets)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    for name in params:
        # the batched loss is the batch mean, the vmapped one per sample: sum / B
        assert rel_err(grads[name].sum(0) / B, reference[name]) <= 1e-10


def test_float32_runs_and_is_close():
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params(dtype=jnp.float32)
    hidden, xs, targets = _data("batched", names, dtype=jnp.float32)
    (losses, _), grads, _ = _run(step, bt.D_RTRL(), params, hidden, xs, targets, True)
    assert losses.dtype == jnp.float32 and grads["w"].dtype == jnp.float32
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-4


def test_every_param_gets_a_gradient_plain_jnp_is_one_step():
    """A plain-jnp recurrent parameter gets its one-step gradient, never a silent zero."""

    def step(p, h, x):
        y = bt.ops.dense(x, p["w"])
        h = 0.5 * h + y + jnp.tanh(h) * p["gain"]  # gain: plain jnp, affects the dynamics
        return h, h @ p["ro"]

    params = {
        "w": jnp.ones((M.N_IN, M.N)) * 0.3,
        "gain": jnp.full((M.N,), 0.2),
        "ro": jnp.ones((M.N, 2)),
    }
    hidden = jnp.zeros((B, M.N))
    _, xs, targets = _data("batched", ("i",))
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    report = learner.report(params, hidden, xs[0])
    assert report.param("['gain']").mode == "one-step"
    assert "plain jnp" in report.param("['gain']").reason
    with pytest.warns(bt.TruncationWarning, match=r"params\['gain'\]"):
        _, grads, _ = _run(step, bt.D_RTRL(), params, hidden, xs, targets, True)
    truncated = one_step_grad(step, M.mse, params, hidden, xs, targets, True)
    assert rel_err(grads["gain"], truncated["gain"]) <= 1e-12
    assert float(jnp.abs(grads["gain"]).max()) > 0


def test_bad_loss_and_target_raise_clear_errors():
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names, t=2)
    learner = bt.compile(step, lambda out, y: (out - y) ** 2, bt.D_RTRL(), batched=True)
    state = learner.init(params, hidden, xs[0])
    with pytest.raises(ValueError, match="must return a scalar"):
        learner.step(params, state, xs[0], targets[0])
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    with pytest.raises(ValueError, match="batch axis"):
        learner.step(params, state, xs[0], targets[0][:2])
    with pytest.raises(ValueError, match="time-major"):
        learner.scan(params, state, xs, targets[:1])
    with pytest.raises(TypeError, match="instance"):
        bt.compile(step, M.mse, bt.D_RTRL)
    with pytest.raises(TypeError, match="LearnerState"):
        learner.step(params, {"hidden": hidden}, xs[0], targets[0])


@pytest.mark.parametrize(
    "algo",
    [bt.D_RTRL(), bt.pp_prop(0.9), bt.pp_prop((0.7, 0.4), warmup_correction=True)],
    ids=repr,
)
def test_bias_trains_like_a_constant_input_column(algo):
    """A bias and a weight row fed by a constant 1 are the same function: same gradient.

    (pp_prop once gave the bias only its output-side trace, 0.1-0.2x too small.)
    """

    def step(p, h, x):
        x1 = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,))], -1)
        h = 0.8 * h + jnp.tanh(bt.ops.dense(x1, p["w"], p["b"]))
        return h, h @ p["ro"]

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w": jax.random.normal(k[0], (4, 5)),
        "b": jnp.zeros(5),
        "ro": jax.random.normal(k[1], (5, 2)),
    }
    xs, targets = jax.random.normal(k[2], (12, B, 3)), jax.random.normal(k[3], (12, B, 2))
    _, grads, _ = _run(step, algo, params, jnp.zeros((B, 5)), xs, targets, True)
    assert rel_err(grads["b"], grads["w"][3]) <= 1e-12


def test_bfloat16_trace_storage():
    """``trace_dtype`` stores traces compactly; the gradient stays close to float32's."""
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params(dtype=jnp.float32)
    hidden, xs, targets = _data("batched", names, dtype=jnp.float32)
    algo = bt.D_RTRL(trace_dtype=jnp.bfloat16)
    _, compact, state = _run(step, algo, params, hidden, xs, targets, True)
    assert {a.dtype for a in jax.tree_util.tree_leaves(state.traces)} == {jnp.dtype("bfloat16")}
    _, full, _ = _run(step, bt.D_RTRL(), params, hidden, xs, targets, True)
    for name in params:
        assert compact[name].dtype == jnp.float32
        assert rel_err(compact[name], full[name]) <= 2e-2
    with pytest.raises(TypeError, match="trace_dtype"):
        bt.D_RTRL(trace_dtype=jnp.int32)


def test_algorithm_by_name():
    assert isinstance(bt.algorithm_by_name("d_rtrl"), bt.D_RTRL)
    assert bt.algorithm_by_name("ES_D_RTRL", decay_or_rank=3).alpha_x == 0.5
    assert isinstance(bt.algorithm_by_name("bptt"), bt.BPTT)
    names = {"d_rtrl", "pp_prop", "snap1", "rtrl", "uoro", "bptt", "one_step"}
    assert set(bt.ALGORITHM_NAMES) == names
    assert isinstance(bt.algorithm_by_name("one_step"), bt.OneStep)
    for name, cls in (("snap1", bt.SnAp1), ("RTRL", bt.RTRL), ("uoro", bt.UORO)):
        assert type(bt.algorithm_by_name(name)) is cls
    with pytest.raises(ValueError, match="unknown algorithm 'snap2'"):
        bt.algorithm_by_name("snap2")


def test_one_step_baseline_is_the_truncated_gradient():
    """``OneStep`` (no traces): ``scan`` sums the one-step gradients; a control for traces."""
    step, make_params, names = EXACT_MODELS["lif"]
    params = make_params()
    hidden, xs, targets = _data("batched", names)
    _, grads, state = _run(step, bt.OneStep(), params, hidden, xs, targets, True)
    truncated = one_step_grad(step, M.mse, params, hidden, xs, targets, True)
    for name in params:
        assert rel_err(grads[name], truncated[name]) <= 1e-12
    assert state.traces == () and bool((state.count == T).all())


# -- a user op whose rules need a frozen operand ----------------------------------------


def _masked_mm(x, w, mask):
    return x @ (w * mask)


def _masked_rules(use_mask):
    def xy_to_dw(x, hidden_dim, w, **_):
        dw = jnp.einsum("...i,...k->ik", x, hidden_dim)
        return {"weight": dw * w["mask"] if use_mask else dw}

    def yw_to_w(hidden_dim, trace, **_):
        return {"weight": trace["weight"] * hidden_dim[..., None, :]}

    return dict(
        yw_to_w=yw_to_w,
        xy_to_dw=xy_to_dw,
        init_drtrl=lambda x_var, y_var, w_var, s: {
            "weight": jnp.zeros(w_var["weight"].shape + (s,), w_var["weight"].dtype)
        },
        init_pp=lambda x_var, y_var, w_var, s: jnp.zeros(y_var.shape + (s,), y_var.dtype),
    )


MASKED = bt.register_primitive(
    "test_alg_masked_mm", _masked_mm, frozen_invars_fn=lambda params: {"mask": 2}
)
MASKED.register_etp_rules(**_masked_rules(use_mask=True))
MASK_BLIND = bt.register_primitive(
    "test_alg_masked_mm_blind", _masked_mm, frozen_invars_fn=lambda params: {"mask": 2}
)
MASK_BLIND.register_etp_rules(**_masked_rules(use_mask=False))
MASK = (jnp.arange(M.N_IN * M.N).reshape(M.N_IN, M.N) % 3 != 0).astype(jnp.float64)


def _masked_lif(prim):
    def step(p, h, x):
        i = 0.8 * h["i"] + prim.bind(x, p["w"], MASK)
        v = 0.7 * h["v"] * (1.0 - M.spike(h["v"] - 1.0)) + 0.3 * i
        return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]

    return step


@pytest.mark.parametrize("mode", ["unbatched", "vmapped"])
def test_rules_see_frozen_operands(mode):
    """A masked dense registered by a user trains exactly: its rules read ``w['mask']``."""
    params = {"w": M.lif_params()["w"], "ro": M.lif_params()["ro"]}
    hidden, xs, targets = _data(mode, ("i", "v"))
    step = _step_for(_masked_lif(MASKED), mode)
    batched = mode != "unbatched"
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, batched)
    _, grads, _ = _run(step, bt.D_RTRL(), params, hidden, xs, targets, batched)
    assert rel_err(grads["w"], reference["w"]) <= 1e-10
    _, pp, _ = _run(step, bt.pp_prop(0.5), params, hidden, xs, targets, batched)
    assert float(jnp.abs(pp["w"] * (1 - MASK)).max()) == 0.0  # masked entries stay untouched
    # Negative control: the same op with a rule blind to the mask is wrong.
    blind = _step_for(_masked_lif(MASK_BLIND), mode)
    _, wrong, _ = _run(blind, bt.D_RTRL(), params, hidden, xs, targets, batched)
    assert rel_err(wrong["w"], reference["w"]) > 1e-3


def test_frozen_operand_computed_in_the_step_is_refused():
    def step(p, h, x):
        h = 0.8 * h + MASKED.bind(x, p["w"], (x[:, None] > 0) * jnp.ones((1, M.N)))
        return h, h.sum()

    with pytest.raises(bt.CompileError, match="frozen operand 'mask'"):
        bt.compile_graph(step, {"w": jnp.ones((M.N_IN, M.N))}, jnp.zeros(M.N), jnp.ones(M.N_IN))
