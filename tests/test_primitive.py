"""The ETP primitive contract: a user-defined op, its derived batched twin, registries.

A masked dense op ``y = scale * x @ (w * mask)`` is registered here the way a user
would; every transform and rule is compared against plain ``jax.numpy`` math or
``jax.vjp`` of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import os
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F32, F64, TOL, assert_close, etp_eqn, prims_of
from jax import lax

import braintrace
from braintrace import registry
from braintrace.contract import RULE_SLOTS, SEED_RULE_SLOTS, OpContract
from braintrace.primitive import compiling
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

REPO = Path(__file__).resolve().parents[1]
B, IN, OUT, V, S = 3, 4, 5, 2, 2
SCALE = 0.5
DTYPES = pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
_COUNTER = itertools.count()


def unique(stem: str) -> str:
    """A primitive name no other test (or re-import) uses."""
    return f"test_{stem}_{uuid.uuid4().hex[:8]}_{next(_COUNTER)}"


def randn(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def sds(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


# -- the user's op ---------------------------------------------------------------------

MASK = (np.random.default_rng(99).random((IN, OUT)) < 0.6).astype(np.float64)


def masked_impl(x, w, mask, *, scale):
    return scale * (x @ (w * mask))


def masked_ref(x, w):
    """Plain jnp (with the same fixed mask), unbatched or batched ``x``."""
    return SCALE * jnp.matmul(x, w * jnp.asarray(MASK, w.dtype))


# The rules see only the trainables ``w``, never the non-trainable ``mask`` operand,
# so they close over the test's fixed mask.
def masked_yw_to_w(output_vector, trace, **params):
    return {"weight": trace["weight"] * output_vector[None, :]}


def masked_xy_to_dw(x, y_cotangent, w, *, scale):
    dw = scale * jnp.outer(x, y_cotangent) * MASK
    return {"weight": dw.astype(w["weight"].dtype)}


def masked_init_drtrl(x_var, y_var, weight_var, num_states):
    var = weight_var["weight"]
    return {"weight": jnp.zeros(tuple(var.shape) + (num_states,), var.dtype)}


def masked_init_pp(x_var, y_var, weight_var, num_states):
    return jnp.zeros(tuple(y_var.shape) + (num_states,), y_var.dtype)


MASKED_RULES = dict(
    yw_to_w=masked_yw_to_w,
    xy_to_dw=masked_xy_to_dw,
    init_drtrl=masked_init_drtrl,
    init_pp=masked_init_pp,
)

MASKED = braintrace.register_primitive(
    unique("masked_mv"), masked_impl, trainable_invars_fn=lambda params: {"weight": 1}
).register_etp_rules(**MASKED_RULES)


def masked(x, w):
    return MASKED.bind(x, w, jnp.asarray(MASK, w.dtype), scale=SCALE)


def make(dtype, batched=False, seed=0):
    x = randn(seed, (B, IN) if batched else (IN,), dtype)
    return x, randn(seed + 1, (IN, OUT), dtype)


# -- 4. the user op under every transform -----------------------------------------------


@DTYPES
def test_user_op_eager_jit_eval_shape(dtype):
    x, w = make(dtype)
    assert_close(masked(x, w), masked_ref(x, w), dtype)
    f = jax.jit(masked)
    assert_close(f(x, w), masked_ref(x, w), dtype)
    assert MASKED in prims_of(f, x, w)
    out = jax.eval_shape(masked, sds(x), sds(w))
    assert (out.shape, out.dtype) == ((OUT,), np.dtype(dtype))


@DTYPES
def test_user_op_grad_and_jvp(dtype):
    x, w = make(dtype)
    cot = randn(5, (OUT,), dtype)
    loss = lambda x, w: jnp.vdot(cot, masked(x, w))  # noqa: E731
    exp = jax.vjp(masked_ref, x, w)[1](cot)
    assert_close(jax.grad(loss, (0, 1))(x, w), exp, dtype)
    assert_close(jax.jit(jax.grad(loss, (0, 1)))(x, w), exp, dtype)
    assert_close(jax.grad(lambda w: loss(x, w))(w), exp[1], dtype)
    assert MASKED in prims_of(jax.grad(loss, (0, 1)), x, w)
    tangents = (randn(6, x.shape, dtype), randn(7, w.shape, dtype))
    assert_close(jax.jvp(masked, (x, w), tangents), jax.jvp(masked_ref, (x, w), tangents), dtype)


@DTYPES
@pytest.mark.parametrize("argnum", [0, 1], ids=["x", "weight"])
def test_user_op_linear_transpose(dtype, argnum):
    x, w = make(dtype)
    args = [x, w]

    def on(fn):
        return lambda v: fn(*[v if i == argnum else a for i, a in enumerate(args)])

    ct = randn(8, (OUT,), dtype)
    (got,) = jax.linear_transpose(on(masked), args[argnum])(ct)
    (exp,) = jax.vjp(on(masked_ref), args[argnum])[1](ct)
    assert_close(got, exp, dtype)
    closed = (
        SCALE * (np.asarray(w) * MASK) @ np.asarray(ct)
        if argnum == 0
        else SCALE * np.outer(np.asarray(x), np.asarray(ct)) * MASK
    )
    np.testing.assert_allclose(got, closed, **TOL[np.dtype(dtype)])


@DTYPES
def test_user_op_vmap_binds_derived_twin(dtype):
    twin = registry.get_batched_counterpart(MASKED)
    assert twin is registry.get_primitive(MASKED.name + "_batched")
    assert registry.is_batched(twin) and not registry.is_batched(MASKED)
    x, w = make(dtype)
    xs = randn(3, (V, IN), dtype)
    f = lambda x: masked(x, w)  # noqa: E731
    assert_close(jax.vmap(f)(xs), masked_ref(xs, w), dtype)
    prims = prims_of(jax.vmap(f), xs)
    assert twin in prims and MASKED not in prims and lax.dot_general_p not in prims
    # the twin itself, under a second vmap (folded into its batch axis) and under grad
    xss = randn(4, (V, B, IN), dtype)
    assert_close(jax.vmap(jax.vmap(f))(xss), masked_ref(xss, w), dtype)
    assert twin in prims_of(jax.vmap(jax.vmap(f)), xss)
    cot = randn(5, (V, OUT), dtype)
    g = jax.grad(lambda w: jnp.vdot(cot, jax.vmap(lambda x: masked(x, w))(xs)))(w)
    assert_close(g, jax.vjp(lambda w: masked_ref(xs, w), w)[1](cot)[0], dtype)


def test_user_op_vmap_with_batched_weight_dissolves():
    x, w = make(F64)
    ws = jnp.stack([w, -w])
    with compiling(), pytest.warns(braintrace.ETPIdentityWarning, match=MASKED.name):
        got = jax.vmap(lambda w: masked(x, w))(ws)
    assert_close(got, jnp.stack([masked_ref(x, w), masked_ref(x, -w)]), F64)


# -- 4. the derived twin's rules --------------------------------------------------------


@DTYPES
def test_derived_twin_rules_match_vjp_of_the_batched_op(dtype):
    twin = registry.get_batched_counterpart(MASKED)
    x, w = make(dtype)
    xs, h = randn(3, (B, IN), dtype), randn(4, (B, OUT), dtype)
    mask = jnp.asarray(MASK, dtype)
    eqn = etp_eqn(jax.vmap(lambda x: masked(x, w)), xs)
    assert eqn.primitive is twin
    params = dict(eqn.params)
    wd = {"weight": w}
    rule = lambda slot: registry.get_rule(twin, slot)  # noqa: E731

    dw = rule("xy_to_dw")(xs, h, wd, **params)
    via_op = jax.vjp(lambda w: twin.bind(xs, w["weight"], mask, **params), wd)[1](h)[0]
    via_ref = jax.vjp(lambda w: masked_ref(xs, w["weight"]), wd)[1](h)[0]
    assert_close(dw, via_op, dtype)
    assert_close(dw, via_ref, dtype)
    # defaults: the trace lives on the trainables, the chain is the identity
    assert_close(rule("xy_to_trace")(xs, h, wd, **params), dw, dtype)
    assert rule("trace_to_dw")(dw, wd, **params) is dw

    trace = {"weight": randn(5, (B, IN, OUT), dtype)}
    scaled = rule("yw_to_w")(h, trace, **params)
    exp = np.einsum("bik,bk->bik", np.asarray(trace["weight"]), np.asarray(h))
    assert_close(scaled, {"weight": exp}, dtype)
    # per sample: yw_to_w(h2, T(h1)) == T(h1 * h2) with T the per-sample VJP
    h2 = randn(6, (B, OUT), dtype)
    per = jax.vmap(lambda x, h: jax.vjp(lambda w: masked_ref(x, w["weight"]), wd)[1](h)[0])
    assert_close(rule("yw_to_w")(h2, per(xs, h), **params), per(xs, h * h2), dtype)

    y = twin.bind(xs, w, mask, **params)
    drtrl = rule("init_drtrl")(sds(xs), sds(y), {"weight": sds(w)}, S)
    assert set(drtrl) == {"weight"}
    assert drtrl["weight"].shape == (B, IN, OUT, S) and drtrl["weight"].dtype == np.dtype(dtype)
    assert not np.any(np.asarray(drtrl["weight"]))
    pp = rule("init_pp")(sds(xs), sds(y), {"weight": sds(w)}, S)
    assert pp.shape == (B, OUT, S) and pp.dtype == np.dtype(dtype) and not np.any(np.asarray(pp))


def test_unbatched_user_rules_match_vjp():
    x, w = make(F64)
    h = randn(2, (OUT,), F64)
    params = dict(etp_eqn(masked, x, w).params)
    dw = registry.get_rule(MASKED, "xy_to_dw")(x, h, {"weight": w}, **params)
    exp = jax.vjp(lambda w: masked_ref(x, w["weight"]), {"weight": w})[1](h)[0]
    assert_close(dw, exp, F64)


def test_wrong_user_rule_fails_the_same_check():
    """Negative control: a rule that forgets the mask disagrees with the VJP."""
    x, w = make(F64)
    h = randn(2, (OUT,), F64)
    wrong = {"weight": SCALE * jnp.outer(x, h)}
    exp = jax.vjp(lambda w: masked_ref(x, w["weight"]), {"weight": w})[1](h)[0]
    assert not np.allclose(wrong["weight"], exp["weight"])


def test_twin_picks_up_rules_installed_later():
    p = braintrace.register_primitive(unique("late"), masked_impl)
    twin = registry.get_batched_counterpart(p)
    xs, h, w = randn(1, (B, IN), F64), randn(2, (B, OUT), F64), randn(3, (IN, OUT), F64)
    with pytest.raises(NotImplementedError, match=f"{p.name!r} has no 'xy_to_dw' rule"):
        registry.get_rule(twin, "xy_to_dw")(xs, h, {"weight": w}, scale=SCALE)
    p.register_xy_to_dw(masked_xy_to_dw)
    got = registry.get_rule(twin, "xy_to_dw")(xs, h, {"weight": w}, scale=SCALE)
    exp = jax.vjp(lambda w: masked_ref(xs, w["weight"]), {"weight": w})[1](h)[0]
    assert_close(got, exp, F64)


# -- other registration options ------------------------------------------------------------


def test_defaults_and_metadata_of_a_registered_primitive():
    p = braintrace.register_primitive(unique("plain"), lambda x, w: x @ w)
    assert isinstance(p, braintrace.ETPPrimitive) and isinstance(p, jax.extend.core.Primitive)
    assert registry.is_etp_primitive(p) and p in registry.ETP_PRIMITIVES
    assert registry.get_trainable_invars(p, {}) == {"weight": 1}
    assert registry.ETP_TRAINABLE_INVARS_FNS[p] is None
    assert registry.get_x_invar_index(p) == 0 and registry.get_y_outvar_index(p) == 0
    assert not registry.is_batched(p) and not registry.is_gradient_enabled(p)
    assert p not in registry.ETP_RULES_YW_TO_W
    with pytest.raises(NotImplementedError, match=r"has no 'yw_to_w' rule.*register_yw_to_w"):
        registry.get_rule(p, "yw_to_w")
    with pytest.raises(KeyError, match="unknown rule slot 'nope'"):
        registry.get_rule(p, "nope")
    with pytest.raises(KeyError, match="no ETP primitive is registered under the name"):
        registry.get_primitive(unique("missing"))
    twin = registry.get_batched_counterpart(p)
    assert twin.name == p.name + "_batched" and registry.is_batched(twin)
    g = braintrace.register_primitive(
        unique("gated"),
        lambda w: jnp.tanh(w),
        batched=True,
        gradient_enabled=True,
        x_invar_index=None,
    )
    assert registry.is_gradient_enabled(g) and g in registry.GRADIENT_ENABLED_PRIMITIVES
    assert registry.get_x_invar_index(g) is None and registry.get_batched_counterpart(g) is None


def test_individual_register_methods_install_each_slot():
    p = braintrace.register_primitive(unique("slots"), masked_impl)
    for slot, fn in MASKED_RULES.items():
        assert getattr(p, f"register_{slot}")(fn) is fn  # usable as a decorator
        assert registry.get_rule(p, slot) is fn
        assert registry.RULE_TABLES[slot][p] is fn


def test_explicit_batched_counterpart_is_used_under_vmap():
    mm = braintrace.register_primitive(unique("mm"), lambda x, w: x @ w, batched=True)
    mv = braintrace.register_primitive(unique("mv"), lambda x, w: x @ w, batched_counterpart=mm)
    assert registry.get_batched_counterpart(mv) is mm
    with pytest.raises(KeyError):  # no twin was derived
        registry.get_primitive(mv.name + "_batched")
    w, xs = randn(1, (IN, OUT), F64), randn(2, (V, IN), F64)
    f = lambda x: mv.bind(x, w)  # noqa: E731
    assert_close(jax.vmap(f)(xs), xs @ w, F64)
    prims = prims_of(jax.vmap(f), xs)
    assert mm in prims and mv not in prims


def test_x_as_second_operand():
    p = braintrace.register_primitive(
        unique("wx"),
        lambda w, x: x @ w,
        x_invar_index=1,
        trainable_invars_fn=lambda params: {"weight": 0},
    )
    w, xs = randn(1, (IN, OUT), F64), randn(2, (V, IN), F64)
    f = lambda x: p.bind(w, x)  # noqa: E731
    assert_close(jax.vmap(f)(xs), xs @ w, F64)
    assert registry.get_batched_counterpart(p) in prims_of(jax.vmap(f), xs)
    g = jax.grad(lambda w: jax.vmap(lambda x: p.bind(w, x))(xs).sum())(w)
    assert_close(g, np.broadcast_to(np.asarray(xs).sum(0)[:, None], (IN, OUT)), F64)


def test_multiple_results_with_y_outvar_index():
    def impl(x, w):
        z = x @ w
        return z, jnp.tanh(z)

    p = braintrace.register_primitive(
        unique("multi"), impl, multiple_results=True, y_outvar_index=1
    )
    assert registry.get_y_outvar_index(p) == 1
    w, x, xs = randn(1, (IN, OUT), F64), randn(2, (IN,), F64), randn(3, (V, IN), F64)
    # a multiple-results primitive's bind returns a list (JAX's convention)
    assert_close(tuple(p.bind(x, w)), impl(x, w), F64)
    assert_close(tuple(jax.jit(lambda x: p.bind(x, w))(x)), impl(x, w), F64)
    assert_close(tuple(jax.vmap(lambda x: p.bind(x, w))(xs)), impl(xs, w), F64)
    assert registry.get_batched_counterpart(p) in prims_of(jax.vmap(lambda x: p.bind(x, w)), xs)
    loss = lambda x, w: p.bind(x, w)[1].sum() + 2 * p.bind(x, w)[0].sum()  # noqa: E731
    ref = lambda x, w: impl(x, w)[1].sum() + 2 * impl(x, w)[0].sum()  # noqa: E731
    assert_close(jax.grad(loss, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), F64)
    tan = (randn(4, (IN,), F64), randn(5, (IN, OUT), F64))
    assert_close(
        jax.jvp(lambda x, w: tuple(p.bind(x, w)), (x, w), tan), jax.jvp(impl, (x, w), tan), F64
    )


def test_op_without_input_dissolves_under_vmap():
    p = braintrace.register_primitive(unique("noinput"), jnp.tanh, x_invar_index=None)
    assert registry.get_batched_counterpart(p) is None
    ws = randn(1, (V, OUT), F64)
    with (
        compiling(),
        pytest.warns(braintrace.ETPIdentityWarning, match="trainable operand is batched"),
    ):
        got = jax.vmap(p.bind)(ws)
    assert_close(got, jnp.tanh(ws), F64)


# -- the op's contract: one frozen object; the old tables are views of it ----------------


def TRAIN_FN(params):  # noqa: N802 (a constant function, named like one)
    return {"weight": 1}


def FROZEN_FN(params):  # noqa: N802
    return {"mask": 2}


def chain_identity(dtrace, w, **params):
    return dtrace


SET_VIEWS = ("ETP_PRIMITIVES", "BATCHED_PRIMITIVES", "GRADIENT_ENABLED_PRIMITIVES")
MAPPING_VIEWS = (
    "ETP_TRAINABLE_INVARS_FNS",
    "ETP_FROZEN_INVARS_FNS",
    "ETP_X_INVAR_INDICES",
    "ETP_Y_OUTVAR_INDICES",
    "BATCHED_COUNTERPARTS",
    *(f"ETP_RULES_{slot.upper()}" for slot in RULE_SLOTS),
)


def views_mentioning(prim) -> list[str]:
    """Old table names whose membership test or iteration mentions ``prim``."""
    found = []
    for name in SET_VIEWS + MAPPING_VIEWS:
        view = getattr(registry, name)
        if prim in view or any(p is prim for p in view):
            found.append(name)
    return found


def test_contract_is_one_frozen_object_replaced_on_rule_installation():
    p = braintrace.register_primitive(
        unique("contract"), masked_impl, trainable_invars_fn=TRAIN_FN, frozen_invars_fn=FROZEN_FN
    )
    before = p.contract
    assert isinstance(before, OpContract) and registry.get_contract(p) is before
    assert (before.batched, before.gradient_enabled, before.multiple_results) == (False,) * 3
    assert (before.x_invar_index, before.y_outvar_index) == (0, 0)
    assert before.trainable_invars_fn is TRAIN_FN and before.frozen_invars_fn is FROZEN_FN
    twin = before.batched_counterpart
    assert before.counterpart_is_derived and twin is registry.get_batched_counterpart(p)
    assert twin.contract.batched and twin.contract.frozen_invars_fn is FROZEN_FN
    assert all(before.rule(slot) is None for slot in RULE_SLOTS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.yw_to_w = masked_yw_to_w
    with pytest.raises(AttributeError):
        p.contract = before

    assert p.register_yw_to_w(masked_yw_to_w) is masked_yw_to_w
    after = p.contract
    assert after is not before and before.yw_to_w is None  # the old object is untouched
    assert after == dataclasses.replace(before, yw_to_w=masked_yw_to_w)
    assert p.register_etp_rules(**MASKED_RULES) is p
    assert {slot: p.contract.rule(slot) for slot in SEED_RULE_SLOTS} == MASKED_RULES
    # the twin's rules are derived from (and look up) the unbatched ones
    assert callable(twin.contract.yw_to_w) and twin.contract.yw_to_w is not masked_yw_to_w


def test_every_old_registry_name_and_accessor_still_works():
    name = unique("views")
    p = braintrace.register_primitive(
        name,
        masked_impl,
        gradient_enabled=True,
        trainable_invars_fn=TRAIN_FN,
        frozen_invars_fn=FROZEN_FN,
    )
    rules = dict(MASKED_RULES, xy_to_trace=masked_xy_to_dw, trace_to_dw=chain_identity)
    p.register_etp_rules(**rules)
    twin = registry.get_batched_counterpart(p)
    for prim in (p, twin):  # membership
        assert prim in registry.ETP_PRIMITIVES and registry.is_etp_primitive(prim)
        assert prim in registry.GRADIENT_ENABLED_PRIMITIVES and registry.is_gradient_enabled(prim)
    assert p not in registry.BATCHED_PRIMITIVES and not registry.is_batched(p)
    assert twin in registry.BATCHED_PRIMITIVES and registry.is_batched(twin)
    for prim in (p, twin):  # metadata tables and accessors
        assert registry.ETP_TRAINABLE_INVARS_FNS[prim] is TRAIN_FN
        assert registry.ETP_FROZEN_INVARS_FNS[prim] is FROZEN_FN
        assert registry.ETP_X_INVAR_INDICES[prim] == registry.get_x_invar_index(prim) == 0
        assert registry.ETP_Y_OUTVAR_INDICES[prim] == registry.get_y_outvar_index(prim) == 0
        assert registry.get_trainable_invars(prim, {}) == {"weight": 1}
        assert registry.get_frozen_invars(prim, {}) == {"mask": 2}
    assert registry.BATCHED_COUNTERPARTS[p] is twin and twin not in registry.BATCHED_COUNTERPARTS
    assert registry.get_batched_counterpart(twin) is None
    assert registry.get_primitive(name) is p is registry.BY_NAME[name]
    assert registry.get_primitive(name + "_batched") is twin
    for slot, fn in rules.items():  # rules: the very objects installed
        table = getattr(registry, f"ETP_RULES_{slot.upper()}")
        assert registry.RULE_TABLES[slot] is table
        assert table[p] is fn and table.get(p) is fn and dict(table)[p] is fn
        assert registry.get_rule(p, slot) is fn and registry.has_rule(p, slot)
        assert registry.has_rule(twin, slot)  # derived
    # iteration agrees with membership
    everything = list(registry.ETP_PRIMITIVES)
    assert p in everything and twin in everything
    assert len(registry.ETP_PRIMITIVES) == len(everything) == len(registry.BY_NAME)
    assert set(registry.BATCHED_PRIMITIVES) == {q for q in everything if registry.is_batched(q)}
    assert set(registry.ETP_RULES_XY_TO_TRACE) == {
        q for q in everything if registry.has_rule(q, "xy_to_trace")
    }
    # the accessors' error messages keep their advice
    with pytest.raises(KeyError, match=r"not a registered ETP primitive; create it with"):
        registry.get_trainable_invars(lax.add_p, {})
    with pytest.raises(KeyError, match="unknown rule slot 'nope'"):
        registry.has_rule(p, "nope")


def test_views_are_read_only_and_say_what_to_call_instead():
    writes = [
        (
            lambda: operator.setitem(registry.ETP_RULES_YW_TO_W, MASKED, masked_yw_to_w),
            r"ETP_RULES_YW_TO_W is a read-only view.*register_yw_to_w\(fn\)",
        ),
        (lambda: registry.RULE_TABLES["init_pp"].pop(MASKED), r"register_init_pp\(fn\)"),
        (lambda: registry.ETP_PRIMITIVES.add(MASKED), r"read-only.*register_primitive"),
        (lambda: registry.BATCHED_PRIMITIVES.discard(MASKED), r"read-only"),
        (lambda: operator.delitem(registry.ETP_X_INVAR_INDICES, MASKED), r"replace=True"),
        (lambda: registry.BATCHED_COUNTERPARTS.update({}), r"read-only"),
        (lambda: operator.setitem(registry.RULE_TABLES, "yw_to_w", {}), r"does not support"),
        (lambda: operator.setitem(registry.BY_NAME, "x", MASKED), r"does not support"),
    ]
    for write, match in writes:
        with pytest.raises(TypeError, match=match):
            write()
    assert registry.ETP_RULES_YW_TO_W[MASKED] is masked_yw_to_w  # nothing changed


def test_replace_and_forget_update_every_view():
    name = unique("renew")
    old = braintrace.register_primitive(
        name, masked_impl, gradient_enabled=True, frozen_invars_fn=FROZEN_FN
    ).register_etp_rules(**MASKED_RULES)
    old_twin = registry.get_batched_counterpart(old)
    new = braintrace.register_primitive(name, masked_impl, replace=True)
    new_twin = registry.get_batched_counterpart(new)
    assert new_twin is not old_twin and new_twin.name == old_twin.name
    for gone in (old, old_twin):
        assert views_mentioning(gone) == []
        assert not registry.is_etp_primitive(gone) and not registry.has_rule(gone, "yw_to_w")
        with pytest.raises(KeyError, match="not a registered ETP primitive"):
            registry.get_rule(gone, "yw_to_w")
    assert registry.get_primitive(name) is new
    assert views_mentioning(new) == [
        "ETP_PRIMITIVES",
        "ETP_TRAINABLE_INVARS_FNS",
        "ETP_FROZEN_INVARS_FNS",
        "ETP_X_INVAR_INDICES",
        "ETP_Y_OUTVAR_INDICES",
        "BATCHED_COUNTERPARTS",
    ]  # no rules yet, not gradient-enabled: nothing of the old op's contract leaked

    # forgetting the derived twin alone: the op stays, its vmap dissolves with a warning
    registry.forget(new_twin)
    assert views_mentioning(new_twin) == [] and registry.get_batched_counterpart(new) is None
    assert "BATCHED_COUNTERPARTS" not in views_mentioning(new) and registry.is_etp_primitive(new)
    w, xs = randn(1, (IN, OUT), F64), randn(2, (V, IN), F64)
    with compiling(), pytest.warns(braintrace.ETPIdentityWarning, match="no batched counterpart"):
        jax.vmap(lambda x: new.bind(x, w, jnp.asarray(MASK), scale=SCALE))(xs)

    # forgetting an op forgets the twin derived for it, and nothing else
    again = braintrace.register_primitive(name, masked_impl, replace=True)
    again_twin = registry.get_batched_counterpart(again)
    others = set(registry.ETP_PRIMITIVES) - {again, again_twin}
    registry.forget(again)
    assert views_mentioning(again) == [] and views_mentioning(again_twin) == []
    assert set(registry.ETP_PRIMITIVES) == others
    with pytest.raises(KeyError, match="no ETP primitive is registered"):
        registry.get_primitive(name + "_batched")


# -- the seed example end to end: a user op trained exactly by D-RTRL ---------------------
#
# The seed contract's defaults (trainable ``{'weight': 1}``, ``x`` at operand 0, no
# batch axis) and its four rules, for ``y = phi(x) @ w`` with a fixed feature map.
# The model is in the exact class (a 2-state neuron driven by the op, no recurrence
# across neurons, a plain readout), so D-RTRL's summed gradient must equal BPTT's.

SEED_T, SEED_B, SEED_IN, SEED_N = 6, 3, 3, 4


def phi(x):
    return x + 0.1 * x**2


def feature_mv(x, w):
    return phi(x) @ w


def seed_rules(sign_blind_yw_to_w=False):
    def yw_to_w(output_vector, trace, **params):
        factor = jnp.abs(output_vector) if sign_blind_yw_to_w else output_vector
        return {"weight": trace["weight"] * factor[None, :]}

    def xy_to_dw(x, y_cotangent, w, **params):
        return {"weight": jnp.outer(phi(x), y_cotangent).astype(w["weight"].dtype)}

    def init_drtrl(x_var, y_var, weight_var, num_states):
        var = weight_var["weight"]
        return {"weight": jnp.zeros(tuple(var.shape) + (num_states,), var.dtype)}

    def init_pp(x_var, y_var, weight_var, num_states):
        return jnp.zeros(tuple(y_var.shape) + (num_states,), y_var.dtype)

    return dict(yw_to_w=yw_to_w, xy_to_dw=xy_to_dw, init_drtrl=init_drtrl, init_pp=init_pp)


SEED_OP = braintrace.register_primitive(unique("feature_mv"), feature_mv)
SEED_OP.register_etp_rules(**seed_rules())
WRONG_OP = braintrace.register_primitive(unique("feature_mv_wrong"), feature_mv)
WRONG_OP.register_etp_rules(**seed_rules(sign_blind_yw_to_w=True))


def seed_step(prim):
    def step(p, h, x):
        i = 0.8 * h["i"] + prim.bind(x, p["w"])
        v = 0.7 * h["v"] + 0.3 * jnp.tanh(i)
        return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]

    return step


def squared_error(out, target):
    return jnp.sum((out - target) ** 2)


def seed_problem(prim, mode):
    """``(step, batched, params, hidden, xs, targets)`` in float64."""
    lead = () if mode == "unbatched" else (SEED_B,)
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    normal = lambda k, shape: jax.random.normal(k, shape, F64)  # noqa: E731
    params = {"w": normal(keys[0], (SEED_IN, SEED_N)), "ro": normal(keys[1], (SEED_N, 2))}
    hidden = {"i": normal(keys[2], lead + (SEED_N,)), "v": normal(keys[3], lead + (SEED_N,))}
    xs = normal(keys[4], (SEED_T,) + lead + (SEED_IN,))
    targets = normal(keys[5], (SEED_T,) + lead + (2,))
    step = seed_step(prim)
    if mode == "vmapped":
        step = jax.vmap(step, in_axes=(None, 0, 0))
    return step, mode != "unbatched", params, hidden, xs, targets


def online_grads(step, batched, params, hidden, xs, targets):
    learner = braintrace.compile(
        step, squared_error, braintrace.D_RTRL(), batched=batched, strict=True
    )
    state = learner.init(params, hidden, xs[0])
    _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
    return grads


# The vmapped run (the derived twin through the compiler) is also covered by
# test_algorithms' frozen-operand user op, so it runs with the slow checks only.
@pytest.mark.parametrize("mode", ["unbatched", pytest.param("vmapped", marks=pytest.mark.slow)])
def test_seed_example_trains_exactly_with_drtrl(mode):
    """``register_primitive`` + ``register_etp_rules``, ``bt.compile``, ``bt.D_RTRL()``."""
    step, batched, params, hidden, xs, targets = seed_problem(SEED_OP, mode)
    bound = SEED_OP if mode == "unbatched" else registry.get_batched_counterpart(SEED_OP)
    assert bound in prims_of(lambda x: step(params, hidden, x), xs[0])  # the op stays visible
    grads = online_grads(step, batched, params, hidden, xs, targets)
    reference = bptt_grad(step, squared_error, params, hidden, xs, targets, batched)
    for name in params:
        assert rel_err(grads[name], reference[name]) <= 1e-10, name


def test_seed_example_with_a_wrong_yw_to_w_rule_fails():
    """Negative control: a ``yw_to_w`` that drops the factor's sign is not BPTT."""
    step, batched, params, hidden, xs, targets = seed_problem(WRONG_OP, "unbatched")
    grads = online_grads(step, batched, params, hidden, xs, targets)
    reference = bptt_grad(step, squared_error, params, hidden, xs, targets, batched)
    assert rel_err(grads["w"], reference["w"]) > 1e-3
    assert rel_err(grads["ro"], reference["ro"]) <= 1e-10  # the readout has no trace


# -- names: duplicates and replacement -----------------------------------------------------


def test_duplicate_name_raises_and_replace_works():
    name = unique("dup")
    old = braintrace.register_primitive(name, lambda x, w: x @ w)
    old_twin = registry.get_batched_counterpart(old)
    with pytest.raises(ValueError, match=f"named {name!r} is already registered.*replace=True"):
        braintrace.register_primitive(name, lambda x, w: x @ w)
    assert registry.get_primitive(name) is old  # the failed call changed nothing

    new = braintrace.register_primitive(name, lambda x, w: 2 * (x @ w), replace=True)
    assert new is not old and registry.get_primitive(name) is new
    assert old not in registry.ETP_PRIMITIVES and old_twin not in registry.ETP_PRIMITIVES
    new_twin = registry.get_batched_counterpart(new)
    assert new_twin is registry.get_primitive(name + "_batched") and new_twin is not old_twin
    for table in (registry.ETP_X_INVAR_INDICES, registry.BATCHED_COUNTERPARTS):
        assert old not in table
    w, xs = randn(1, (IN, OUT), F64), randn(2, (V, IN), F64)
    f = lambda x: new.bind(x, w)  # noqa: E731
    assert_close(jax.vmap(f)(xs), 2 * (xs @ w), F64)
    assert new_twin in prims_of(jax.vmap(f), xs)


def test_twin_name_clash_leaves_nothing_registered():
    name = unique("clash")
    taken = braintrace.register_primitive(name + "_batched", lambda x, w: x @ w, batched=True)
    before = set(registry.ETP_PRIMITIVES)
    with pytest.raises(ValueError, match=f"would be named {name + '_batched'!r}"):
        braintrace.register_primitive(name, lambda x, w: x @ w)
    assert set(registry.ETP_PRIMITIVES) == before
    with pytest.raises(KeyError):
        registry.get_primitive(name)
    assert registry.get_primitive(name + "_batched") is taken
    # an explicit counterpart avoids the derived name altogether
    p = braintrace.register_primitive(name, lambda x, w: x @ w, batched_counterpart=taken)
    assert registry.get_batched_counterpart(p) is taken


def test_replacing_the_counterpart_does_not_break_vmap():
    p = braintrace.register_primitive(unique("orphan"), lambda x, w: x @ w)
    braintrace.register_primitive(
        p.name + "_batched", lambda x, w: x @ w, batched=True, replace=True
    )
    assert registry.get_batched_counterpart(p) is None
    w, xs = randn(1, (IN, OUT), F64), randn(2, (V, IN), F64)
    with compiling(), pytest.warns(braintrace.ETPIdentityWarning, match="no batched counterpart"):
        got = jax.vmap(lambda x: p.bind(x, w))(xs)
    assert_close(got, xs @ w, F64)


# -- 7. bad registration ------------------------------------------------------------------


def test_non_callable_rule_is_refused_all_or_nothing():
    p = braintrace.register_primitive(unique("badrule"), masked_impl)
    with pytest.raises(
        TypeError,
        match=rf"ETP primitive {p.name!r}: the 'yw_to_w' rule must "
        r"be callable, got int",
    ):
        p.register_etp_rules(yw_to_w=3)
    with pytest.raises(TypeError, match="the 'init_pp' rule must be callable, got str"):
        p.register_etp_rules(yw_to_w=masked_yw_to_w, init_pp="zeros")
    assert not registry.has_rule(p, "yw_to_w")  # nothing half-installed
    with pytest.raises(TypeError, match="the 'xy_to_dw' rule must be callable"):
        p.register_xy_to_dw(None)


BAD_REGISTRATION = [
    ("empty-name", dict(name=""), TypeError, r"register_primitive: name must be a non-empty str"),
    ("impl", dict(impl_fn=3), TypeError, r"impl_fn must be callable, got int"),
    (
        "invars-fn",
        dict(trainable_invars_fn={"weight": 1}),
        TypeError,
        r"trainable_invars_fn must be callable",
    ),
    (
        "x-index",
        dict(x_invar_index=-1),
        TypeError,
        r"x_invar_index must be a non-negative int or None, got -1",
    ),
    (
        "y-index",
        dict(y_outvar_index=1),
        ValueError,
        r"y_outvar_index=1 needs multiple_results=True",
    ),
    (
        "batched-with-counterpart",
        dict(batched=True, batched_counterpart="mm"),
        ValueError,
        r"a batched primitive has no batched_counterpart",
    ),
    (
        "counterpart-not-batched",
        dict(batched_counterpart="mv"),
        ValueError,
        r"batched_counterpart must be a registered batched ETP primitive",
    ),
]


@pytest.mark.parametrize(
    "kwargs,exc,match", [b[1:] for b in BAD_REGISTRATION], ids=[b[0] for b in BAD_REGISTRATION]
)
def test_bad_registration(kwargs, exc, match):
    kwargs = dict(kwargs)
    if kwargs.get("batched_counterpart") == "mm":
        kwargs["batched_counterpart"] = braintrace.ops.etp_mm
    if kwargs.get("batched_counterpart") == "mv":
        kwargs["batched_counterpart"] = braintrace.ops.etp_mv
    name = kwargs.pop("name", unique("bad"))
    impl = kwargs.pop("impl_fn", lambda x, w: x @ w)
    before = set(registry.ETP_PRIMITIVES)
    with pytest.raises(exc, match=match):
        braintrace.register_primitive(name, impl, **kwargs)
    assert set(registry.ETP_PRIMITIVES) == before


# -- 5. the README example ---------------------------------------------------------------

README_EXAMPLE = """
import jax.numpy as jnp, braintrace
def my_impl(x, w): return x @ w
my_p = braintrace.register_primitive('etp_demo_mm', my_impl, batched=True)
y = my_p.bind(jnp.ones((2, 3)), jnp.ones((3, 4))); assert y.shape == (2, 4)
"""


@pytest.mark.slow
def test_readme_example_runs_as_written():
    """The ``register_primitive`` example, in a fresh interpreter (float32 defaults).

    ``tests/test_readme.py`` runs README.md's own blocks; this pins the example here.
    """
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", README_EXAMPLE + "print('README-OK')"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "README-OK" in res.stdout
