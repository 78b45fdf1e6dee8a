"""Built-in ETP ops (dense, LoRA, elementwise): transforms, jaxpr identity, rules, errors.

Every check compares the op against an independent computation: a plain
``jax.numpy`` reimplementation (:meth:`Case.ref`), ``jax.vjp`` / ``jax.jvp`` of that
reimplementation, or a closed form written with ``numpy.einsum``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import F32, F64, assert_close, etp_eqn, prims_of
from jax import lax

import braintrace
from braintrace import ops, registry
from braintrace.contract import RULE_SLOTS
from braintrace.primitive import compiling

B, IN, OUT, R, V, S = 3, 4, 5, 2, 2, 2
SCALE = 0.5
BF16 = jnp.bfloat16
DTYPES = pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
tree_map = jax.tree_util.tree_map


# -- helpers --------------------------------------------------------------------


def sds(tree):
    return tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def randn(seed, shape, dtype):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def rand_like(seed, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten([randn(seed + i, a.shape, a.dtype) for i, a in enumerate(leaves)])


def softplus_ref(w):
    return jnp.log1p(jnp.exp(w))  # written out, independent of jax.nn.softplus


# -- the op cases -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of a built-in op, with its plain-jnp reference."""

    kind: str  # 'dense' | 'lora' | 'elemwise'
    batched: bool = False
    layout: str = "in_out"
    bias: bool = False
    base: bool = False
    fn: Any = None

    def __str__(self) -> str:
        parts = [self.kind, "mm" if self.batched else "mv"]
        if self.kind == "dense":
            parts.append(self.layout)
        if self.kind == "elemwise":
            parts = [self.kind, "id" if self.fn is None else "softplus"]
        if self.bias:
            parts.append("bias")
        if self.base:
            parts.append("base")
        return "-".join(parts)

    @property
    def _prims(self):
        return {
            "dense": (ops.etp_mv, ops.etp_mm),
            "lora": (ops.etp_lora_mv, ops.etp_lora_mm),
            "elemwise": (ops.etp_elemwise, ops.etp_elemwise),
        }[self.kind]

    @property
    def prim(self):
        return self._prims[self.batched]

    @property
    def batched_prim(self):
        return self._prims[1]

    @property
    def has_x(self) -> bool:
        return self.kind != "elemwise"

    def y_shape(self) -> tuple:
        return (B, OUT) if self.batched else (OUT,)

    def make(self, dtype, seed=0):
        """``(x, w, frozen)``: input (None for elemwise), trainables, frozen operands."""
        r = lambda *shape: randn(seed + len(shape) * 7 + sum(shape), shape, dtype)  # noqa: E731
        x, frozen = None, {}
        if self.kind == "elemwise":
            return None, {"weight": r(OUT)}, frozen
        x = r(B, IN) if self.batched else r(IN)
        if self.kind == "dense":
            w = {"weight": r(IN, OUT) if self.layout == "in_out" else r(OUT, IN)}
        else:
            w = {
                "lora_a": randn(seed + 11, (IN, R), dtype),
                "lora_b": randn(seed + 12, (R, OUT), dtype),
            }
            if self.base:
                frozen["base_weight"] = randn(seed + 13, (IN, OUT), dtype)
        if self.bias:
            w["bias"] = randn(seed + 14, (OUT,), dtype)
        return x, w, frozen

    def op(self, x, w, frozen):
        if self.kind == "dense":
            return ops.dense(x, w["weight"], w.get("bias"), weight_layout=self.layout)
        if self.kind == "lora":
            return ops.lora(
                x,
                w["lora_a"],
                w["lora_b"],
                w.get("bias"),
                scale=SCALE,
                base_weight=frozen.get("base_weight"),
            )
        return ops.elemwise(w["weight"], self.fn)

    def effective_weight(self, w, frozen):
        """Dense: the (in, out) kernel; LoRA: ``W0 + s A B``."""
        if self.kind == "dense":
            return w["weight"] if self.layout == "in_out" else w["weight"].T
        eff = SCALE * jnp.matmul(w["lora_a"], w["lora_b"])
        return eff + frozen["base_weight"] if self.base else eff

    def ref(self, x, w, frozen):
        if self.kind == "elemwise":
            y = w["weight"] if self.fn is None else softplus_ref(w["weight"])
        else:
            y = jnp.matmul(x, self.effective_weight(w, frozen))
        return y + w["bias"] if self.bias else y

    def linear_groups(self) -> list[tuple[str, ...]]:
        """Operand groups the op is jointly linear in (the others held fixed)."""
        b = ("bias",) if self.bias else ()
        if self.kind == "dense":
            return [("x",) + b, ("weight",) + b]
        if self.kind == "lora":
            groups = [("x",) + b]
            if not self.base:
                groups += [("lora_a",) + b, ("lora_b",) + b]
            return groups
        return [("weight",)] if self.fn is None else []

    def trace_shapes(self) -> dict:
        """One sample's D-RTRL trace leaves, without the state axis."""
        if self.kind == "elemwise":
            return {"weight": (OUT,)}
        shapes = {"weight": (OUT, IN) if self.layout == "out_in" else (IN, OUT)}
        if self.bias:
            shapes["bias"] = (OUT,)
        return shapes


DENSE = [
    Case("dense", batched, layout, bias)
    for layout in ops.WEIGHT_LAYOUTS
    for bias in (False, True)
    for batched in (False, True)
]
LORA = [
    Case("lora", batched, bias=bias, base=base)
    for bias in (False, True)
    for base in (False, True)
    for batched in (False, True)
]
ELEMWISE = [Case("elemwise"), Case("elemwise", fn=jax.nn.softplus)]
ALL = DENSE + LORA + ELEMWISE
WITH_X = DENSE + LORA
BATCHED = [c for c in WITH_X if c.batched]
UNBATCHED = [c for c in WITH_X if not c.batched]
LINEAR = [(c, g) for c in ALL for g in c.linear_groups()]

all_cases = pytest.mark.parametrize("case", ALL, ids=str)


def bound(case, frozen):
    """``f(x, w)`` for the op (frozen operands closed over)."""
    return lambda x, w: case.op(x, w, frozen)


def bound_ref(case, frozen):
    return lambda x, w: case.ref(x, w, frozen)


# -- 1. transforms agree with plain jnp -------------------------------------------


@DTYPES
@all_cases
def test_eager(case, dtype):
    x, w, fr = case.make(dtype)
    y = case.op(x, w, fr)
    assert y.shape == case.y_shape()
    assert_close(y, case.ref(x, w, fr), dtype)


@DTYPES
@all_cases
def test_jit_and_jaxpr_keeps_op(case, dtype):
    x, w, fr = case.make(dtype)
    f = jax.jit(bound(case, fr))
    assert_close(f(x, w), case.ref(x, w, fr), dtype)
    prims = prims_of(f, x, w)
    assert prims[0] is not case.prim  # the op sits inside the jit's nested jaxpr
    assert case.prim in prims


@DTYPES
@all_cases
def test_grad(case, dtype):
    x, w, fr = case.make(dtype)
    cot = randn(5, case.y_shape(), dtype)
    loss = lambda fn: lambda x, w: jnp.vdot(cot, fn(x, w))  # noqa: E731
    _, vjp = jax.vjp(bound_ref(case, fr), x, w)
    exp_x, exp_w = vjp(cot)
    argnums = (0, 1) if case.has_x else 1
    exp = (exp_x, exp_w) if case.has_x else exp_w
    f = loss(bound(case, fr))
    assert_close(jax.grad(f, argnums)(x, w), exp, dtype)
    assert_close(jax.jit(jax.grad(f, argnums))(x, w), exp, dtype)
    # each trainable on its own (the others get symbolic-zero tangents)
    for name in w:
        g = jax.grad(lambda v, name=name: f(x, {**w, name: v}))(w[name])
        assert_close(g, exp_w[name], dtype)
    # the forward pass of a gradient computation still holds the ETP op
    assert case.prim in prims_of(jax.grad(f, argnums), x, w)


@DTYPES
@all_cases
def test_jvp(case, dtype):
    x, w, fr = case.make(dtype)
    tw = rand_like(20, w)
    if case.has_x:
        primals, tangents = (x, w), (randn(30, x.shape, dtype), tw)
        f, f_ref = bound(case, fr), bound_ref(case, fr)
    else:
        primals, tangents = (w,), (tw,)
        f = lambda w: case.op(None, w, fr)  # noqa: E731
        f_ref = lambda w: case.ref(None, w, fr)  # noqa: E731
    assert_close(jax.jvp(f, primals, tangents), jax.jvp(f_ref, primals, tangents), dtype)


@DTYPES
@pytest.mark.parametrize(
    "case,group", LINEAR, ids=lambda v: str(v) if isinstance(v, Case) else "+".join(v)
)
def test_linear_transpose(case, group, dtype):
    x, w, fr = case.make(dtype)
    values = {"x": x, **w}

    def on(fn):
        def f(*lin):
            v = {**values, **dict(zip(group, lin))}
            return fn(v["x"], {k: v[k] for k in w}, fr)

        return f

    primals = [values[n] for n in group]
    ct = randn(6, case.y_shape(), dtype)
    got = jax.linear_transpose(on(case.op), *primals)(ct)
    _, vjp = jax.vjp(on(case.ref), *primals)  # the reference is linear in `group`
    assert_close(tuple(got), tuple(vjp(ct)), dtype)
    got_jit = jax.jit(jax.linear_transpose(on(case.op), *primals))(ct)
    assert_close(tuple(got_jit), tuple(vjp(ct)), dtype)


@pytest.mark.parametrize("layout", ops.WEIGHT_LAYOUTS)
def test_linear_transpose_closed_form(layout):
    w = randn(1, (IN, OUT) if layout == "in_out" else (OUT, IN), F64)
    ct = randn(2, (OUT,), F64)
    (got,) = jax.linear_transpose(
        lambda x: ops.dense(x, w, weight_layout=layout), jnp.zeros(IN, F64)
    )(ct)
    kernel = np.asarray(w) if layout == "in_out" else np.asarray(w).T
    np.testing.assert_allclose(got, kernel @ np.asarray(ct), rtol=1e-12, atol=1e-12)


@DTYPES
@all_cases
def test_eval_shape(case, dtype):
    x, w, fr = case.make(dtype)
    got = jax.eval_shape(bound(case, fr), sds(x), sds(w))
    exp = jax.eval_shape(bound_ref(case, fr), sds(x), sds(w))
    assert (got.shape, got.dtype) == (exp.shape, exp.dtype) == (case.y_shape(), np.dtype(dtype))


@all_cases
def test_bfloat16_forward(case):
    x, w, fr = case.make(BF16)
    y = case.op(x, w, fr)
    assert y.dtype == np.dtype(BF16) and y.shape == case.y_shape()
    up = lambda t: tree_map(lambda a: a.astype(F32), t)  # noqa: E731
    exp = case.ref(up(x), up(w), up(fr))
    np.testing.assert_allclose(np.asarray(y, np.float32), exp, rtol=3e-2, atol=5e-2)


def test_dense_dtype_argument_casts_inside_the_op():
    x, w = randn(1, (B, IN), F32), randn(2, (IN, OUT), F64)
    y = ops.dense(x, w, dtype=F32)
    assert y.dtype == np.dtype(F32)
    assert_close(y, x @ w.astype(F32), F32)
    eqn = etp_eqn(lambda x, w: ops.dense(x, w, dtype=F32), x, w)
    assert eqn.invars[1].aval.dtype == np.dtype(F64)  # the raw parameter reaches the op
    g = jax.grad(lambda w: ops.dense(x, w, dtype=F32).sum())(w)
    assert g.dtype == np.dtype(F64)
    np.testing.assert_allclose(
        g, np.broadcast_to(np.asarray(x).sum(0)[:, None], (IN, OUT)), rtol=1e-6
    )


# -- 2. identity under vmap ---------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("case", WITH_X, ids=str)
def test_vmap_over_x(case, dtype):
    x, w, fr = case.make(dtype)
    xs = randn(7, (V,) + x.shape, dtype)
    f = lambda x: case.op(x, w, fr)  # noqa: E731
    exp = jnp.stack([case.ref(xs[i], w, fr) for i in range(V)])
    assert_close(jax.vmap(f)(xs), exp, dtype)
    prims = prims_of(jax.vmap(f), xs)
    assert case.batched_prim in prims  # etp_mv -> etp_mm; etp_mm stays etp_mm
    if not case.batched:
        assert case.prim not in prims
    assert lax.dot_general_p not in prims  # it did not dissolve into plain jnp
    assert case.batched_prim in prims_of(jax.vmap(jax.jit(f)), xs)


@pytest.mark.parametrize("case", UNBATCHED, ids=str)
def test_nested_vmap_of_unbatched_op(case):
    x, w, fr = case.make(F64)
    xs = randn(8, (V, B, IN), F64)
    f = lambda x: case.op(x, w, fr)  # noqa: E731
    got = jax.vmap(jax.vmap(f))(xs)
    exp = jnp.stack([jnp.stack([case.ref(xs[i, j], w, fr) for j in range(B)]) for i in range(V)])
    assert_close(got, exp, F64)
    prims = prims_of(jax.vmap(jax.vmap(f)), xs)
    assert case.batched_prim in prims and case.prim not in prims


@pytest.mark.parametrize("case", BATCHED, ids=str)
def test_vmap_of_batched_op_on_other_axes(case):
    x, w, fr = case.make(F64)
    xs = randn(9, (B, V, IN), F64)  # vmapped axis is 1, the op's batch axis 0
    f = lambda x: case.op(x, w, fr)  # noqa: E731
    got = jax.vmap(f, in_axes=1, out_axes=1)(xs)
    exp = jnp.stack([case.ref(xs[:, i], w, fr) for i in range(V)], axis=1)
    assert got.shape == (B, V, OUT)
    assert_close(got, exp, F64)
    assert case.prim in prims_of(jax.vmap(f, in_axes=1, out_axes=1), xs)


@pytest.mark.parametrize("case", WITH_X + ELEMWISE, ids=str)
def test_vmap_with_batched_weight_dissolves_with_warning(case):
    x, w, fr = case.make(F64)
    ws = tree_map(lambda a: jnp.stack([a, 2 * a + 1]), w)
    f = lambda w: case.op(x, w, fr)  # noqa: E731
    with (
        compiling(),
        pytest.warns(braintrace.ETPIdentityWarning, match="cannot stay an ETP primitive"),
    ):
        got = jax.vmap(f)(ws)
    exp = jnp.stack([case.ref(x, tree_map(lambda a, i=i: a[i], ws), fr) for i in range(2)])
    assert_close(got, exp, F64)
    # Outside the compiler nothing is lost, so nothing is said (warnings are errors here).
    assert_close(jax.vmap(f)(ws), exp, F64)
    with compiling(), pytest.warns(braintrace.ETPIdentityWarning):
        prims = prims_of(jax.vmap(f), ws)
    assert not any(registry.is_etp_primitive(p) for p in prims)
    if case.has_x:  # x and the weight both batched: dissolves too
        xs = randn(3, (2,) + x.shape, F64)
        with (
            compiling(),
            pytest.warns(braintrace.ETPIdentityWarning, match="other than x is batched"),
        ):
            got = jax.vmap(lambda x, w: case.op(x, w, fr))(xs, ws)
        exp = jnp.stack([case.ref(xs[i], tree_map(lambda a, i=i: a[i], ws), fr) for i in range(2)])
        assert_close(got, exp, F64)


def test_vmap_around_elemwise_with_unbatched_weight_keeps_op():
    w = randn(1, (OUT,), F64)
    xs = randn(2, (V, OUT), F64)
    f = lambda x: x * ops.elemwise(w, jax.nn.softplus)  # noqa: E731
    assert_close(jax.vmap(f)(xs), xs * softplus_ref(w)[None], F64)
    assert ops.etp_elemwise in prims_of(jax.vmap(f), xs)  # and no warning (it is an error)


def test_op_inside_scan_stays_visible_and_differentiates():
    """An RNN-style scan: the op sits in the scan body's nested jaxpr; grads match."""
    w, u = randn(1, (OUT, OUT), F64), randn(2, (IN, OUT), F64)
    xs, h0 = randn(3, (6, B, IN), F64), jnp.zeros((B, OUT), F64)

    def run(w, dense):
        def step(h, x):
            h = jnp.tanh(dense(h, w) + x @ u)
            return h, h

        return jax.lax.scan(step, h0, xs)[1].sum()

    etp = lambda h, w: ops.dense(h, w)  # noqa: E731
    plain = lambda h, w: h @ w  # noqa: E731
    assert ops.etp_mm in prims_of(lambda w: run(w, etp), w)
    assert_close(jax.grad(run)(w, etp), jax.grad(run)(w, plain), F64)


def test_elemwise_second_order():
    w = randn(1, (OUT,), F64)
    hess = jax.hessian(lambda w: ops.elemwise(w, jax.nn.softplus).sum())(w)
    sig = 1 / (1 + np.exp(-np.asarray(w)))
    np.testing.assert_allclose(hess, np.diag(sig * (1 - sig)), rtol=1e-12, atol=1e-12)


# -- 3. rules ---------------------------------------------------------------------------


def eqn_params(case, x, w, fr) -> dict:
    """The op's keyword params, read off its jaxpr equation (the compiler's source)."""
    eqn = etp_eqn(bound(case, fr), x, w)
    assert eqn.primitive is case.prim
    return dict(eqn.params)


def rule(case, slot):
    return registry.get_rule(case.prim, slot)


def trace_vjp(case, x, w, fr, h):
    """One sample's instantaneous D-RTRL term, by jax.vjp of the reference.

    Dense / elemwise: the VJP w.r.t. the trainables. LoRA: w.r.t. the effective
    weight ``W0 + s A B`` (and bias), where its trace lives.
    """
    if case.kind != "lora":
        return jax.vjp(lambda w: case.ref(x, w, fr), w)[1](h)[0]
    eff = {"weight": case.effective_weight(w, fr)}
    if case.bias:
        eff["bias"] = w["bias"]
    f = lambda e: x @ e["weight"] + e["bias"] if case.bias else x @ e["weight"]  # noqa: E731
    return jax.vjp(f, eff)[1](h)[0]


def per_sample_trace(case, x, w, fr, h):
    if case.batched:
        return jax.vmap(lambda xi, hi: trace_vjp(case, xi, w, fr, hi))(x, h)
    return trace_vjp(case, x, w, fr, h)


@DTYPES
@all_cases
def test_rule_xy_to_dw_is_the_vjp(case, dtype):
    x, w, fr = case.make(dtype)
    params = eqn_params(case, x, w, fr)
    h = randn(3, case.y_shape(), dtype)
    got = rule(case, "xy_to_dw")(x, h, w, **params)
    exp = jax.vjp(lambda w: case.ref(x, w, fr), w)[1](h)[0]  # sums over the batch
    assert_close(got, exp, dtype)
    if case.batched:  # = the sum of the unbatched primitive's rule over samples
        unb = registry.get_rule(dataclasses.replace(case, batched=False).prim, "xy_to_dw")
        per = [unb(x[i], h[i], w, **params) for i in range(B)]
        assert_close(got, tree_map(lambda *a: sum(a), *per), dtype)


@pytest.mark.parametrize("case", BATCHED, ids=str)
def test_rules_on_a_batch_of_one(case):
    """The learner's per-sample view: batched rules on a leading axis of size 1."""
    x, w, fr = case.make(F64)
    x1, h1 = x[:1], randn(3, (1, OUT), F64)
    params = eqn_params(case, x1, w, fr)
    exp = jax.vjp(lambda w: case.ref(x1, w, fr), w)[1](h1)[0]
    assert_close(rule(case, "xy_to_dw")(x1, h1, w, **params), exp, F64)
    if case.kind == "lora":
        trace = tree_map(lambda a: a.sum(0), per_sample_trace(case, x1, w, fr, h1))
        assert_close(rule(case, "xy_to_trace")(x1, h1, w, **params), trace, F64)


_OUT_AXIS_SPEC = {"in_out": "...ik,...k->...ik", "out_in": "...ki,...k->...ki"}


@DTYPES
@all_cases
def test_rule_yw_to_w_closed_form(case, dtype):
    x, w, fr = case.make(dtype)
    params = eqn_params(case, x, w, fr)
    lead = (B,) if case.batched else ()
    shapes = case.trace_shapes()
    trace = {k: randn(40 + i, lead + s, dtype) for i, (k, s) in enumerate(shapes.items())}
    h = randn(4, lead + (OUT,), dtype)
    got = rule(case, "yw_to_w")(h, trace, **params)
    t, hn = {k: np.asarray(v) for k, v in trace.items()}, np.asarray(h)
    spec = "...k,...k->...k" if case.kind == "elemwise" else _OUT_AXIS_SPEC[case.layout]
    exp = {"weight": np.einsum(spec, t["weight"], hn)}
    if case.bias:
        exp["bias"] = t["bias"] * hn
    assert_close(got, exp, dtype)


@all_cases
def test_rule_yw_to_w_scales_the_output_side(case):
    """yw_to_w(h2, T(h1)) == T(h1 * h2), T the (per-sample) VJP into trace space."""
    x, w, fr = case.make(F64)
    params = eqn_params(case, x, w, fr)
    h1, h2 = randn(1, case.y_shape(), F64), randn(2, case.y_shape(), F64)
    got = rule(case, "yw_to_w")(h2, per_sample_trace(case, x, w, fr, h1), **params)
    assert_close(got, per_sample_trace(case, x, w, fr, h1 * h2), F64)


def test_wrong_yw_to_w_fails_the_same_check():
    """Negative control: scaling the *input* axis (square kernel) is caught."""
    case = Case("dense")
    x, wt = randn(1, (OUT,), F64), {"weight": randn(2, (OUT, OUT), F64)}
    h1, h2 = randn(3, (OUT,), F64), randn(4, (OUT,), F64)
    eps = trace_vjp(case, x, wt, {}, h1)
    want = trace_vjp(case, x, wt, {}, h1 * h2)["weight"]
    right = registry.get_rule(ops.etp_mv, "yw_to_w")
    params = dict(weight_layout="in_out", has_bias=False, dtype=None, precision=None)
    np.testing.assert_allclose(right(h2, eps, **params)["weight"], want, rtol=1e-12)
    wrong = lambda h, t: {"weight": t["weight"] * h[:, None]}  # noqa: E731
    assert not np.allclose(wrong(h2, eps)["weight"], want)
    # the right rule with the wrong layout parameter is caught too
    swapped = right(h2, eps, **{**params, "weight_layout": "out_in"})["weight"]
    assert not np.allclose(swapped, want)


def _expected_drtrl_shapes(case, w) -> dict:
    lead = (B,) if case.batched else ()
    if case.kind == "lora":
        shapes = {"weight": (IN, OUT)}
        if case.bias:
            shapes["bias"] = (OUT,)
    else:
        shapes = {k: v.shape for k, v in w.items()}
    return {k: lead + tuple(s) + (S,) for k, s in shapes.items()}


@DTYPES
@all_cases
def test_rule_init_shapes_and_dtype(case, dtype):
    x, w, fr = case.make(dtype)
    y = case.ref(x, w, fr)
    x_var, y_var, w_var = (None if x is None else sds(x)), sds(y), sds(w)
    drtrl = rule(case, "init_drtrl")(x_var, y_var, w_var, S)
    exp = _expected_drtrl_shapes(case, w)
    assert set(drtrl) == set(exp)
    for k, v in drtrl.items():
        assert v.shape == exp[k] and v.dtype == np.dtype(dtype) and not np.any(np.asarray(v))
    pp = rule(case, "init_pp")(x_var, y_var, w_var, S)
    assert pp.shape == y.shape + (S,) and pp.dtype == np.dtype(dtype)
    assert not np.any(np.asarray(pp))


@DTYPES
@pytest.mark.parametrize("case", LORA, ids=str)
def test_lora_effective_weight_chain(case, dtype):
    x, w, fr = case.make(dtype)
    params = eqn_params(case, x, w, fr)
    h = randn(3, case.y_shape(), dtype)
    to_trace, to_dw = rule(case, "xy_to_trace"), rule(case, "trace_to_dw")
    # the chain is exact: trace_to_dw(xy_to_trace) == xy_to_dw
    tr = to_trace(x, h, w, **params)
    assert_close(to_dw(tr, w, **params), rule(case, "xy_to_dw")(x, h, w, **params), dtype)
    # xy_to_trace is the VJP w.r.t. the effective weight (summed over the batch)
    summed = (
        tree_map(lambda a: a.sum(0), per_sample_trace(case, x, w, fr, h))
        if case.batched
        else per_sample_trace(case, x, w, fr, h)
    )
    assert_close(tr, summed, dtype)
    # trace_to_dw is the VJP of (A, B) -> W0 + s A B; bias passes through
    d_eff = {k: randn(50 + i, v.shape, dtype) for i, (k, v) in enumerate(tr.items())}
    chain = lambda a, b: case.effective_weight({"lora_a": a, "lora_b": b}, fr)  # noqa: E731
    da, db = jax.vjp(chain, w["lora_a"], w["lora_b"])[1](d_eff["weight"])
    exp = {"lora_a": da, "lora_b": db}
    if case.bias:
        exp["bias"] = d_eff["bias"]
    assert_close(to_dw(d_eff, w, **params), exp, dtype)
    # linear, so it commutes with summing traces over time
    d2 = tree_map(lambda a: 3 * a + 1, d_eff)
    both = to_dw(tree_map(lambda a, b: a + b, d_eff, d2), w, **params)
    apart = tree_map(lambda a, b: a + b, to_dw(d_eff, w, **params), to_dw(d2, w, **params))
    assert_close(both, apart, dtype)


# -- 6. registry metadata of the built-ins ---------------------------------------------


def test_public_registry_names():
    """The old tables are read-only Set / Mapping views (full check: test_primitive.py)."""
    for name in ("ETP_PRIMITIVES", "BATCHED_PRIMITIVES", "GRADIENT_ENABLED_PRIMITIVES"):
        assert isinstance(getattr(registry, name), collections.abc.Set), name
    for name in (
        "ETP_TRAINABLE_INVARS_FNS",
        "ETP_FROZEN_INVARS_FNS",
        "ETP_X_INVAR_INDICES",
        "ETP_Y_OUTVAR_INDICES",
        "BATCHED_COUNTERPARTS",
    ):
        assert isinstance(getattr(registry, name), collections.abc.Mapping), name
    for slot in RULE_SLOTS:
        table = getattr(registry, f"ETP_RULES_{slot.upper()}")
        assert isinstance(table, collections.abc.Mapping)
        assert registry.RULE_TABLES[slot] is table
    assert set(registry.RULE_TABLES) == set(RULE_SLOTS)


BUILTIN_META = [
    # prim, batched, gradient_enabled, x index, batched counterpart, extra rule slots
    (ops.etp_mv, False, False, 0, ops.etp_mm, ()),
    (ops.etp_mm, True, False, 0, None, ()),
    (ops.etp_lora_mv, False, False, 0, ops.etp_lora_mm, ("xy_to_trace", "trace_to_dw")),
    (ops.etp_lora_mm, True, False, 0, None, ("xy_to_trace", "trace_to_dw")),
    (ops.etp_elemwise, False, True, None, None, ()),
]


@pytest.mark.parametrize(
    "prim,batched,grad_enabled,x_index,counterpart,extra",
    BUILTIN_META,
    ids=lambda v: v.name if isinstance(v, braintrace.ETPPrimitive) else "",
)
def test_builtin_registry_metadata(prim, batched, grad_enabled, x_index, counterpart, extra):
    assert isinstance(prim, braintrace.ETPPrimitive)
    assert registry.is_etp_primitive(prim) and prim in registry.ETP_PRIMITIVES
    assert registry.get_primitive(prim.name) is prim
    assert (prim in registry.BATCHED_PRIMITIVES) is batched is registry.is_batched(prim)
    assert (prim in registry.GRADIENT_ENABLED_PRIMITIVES) is grad_enabled
    assert registry.ETP_X_INVAR_INDICES[prim] == registry.get_x_invar_index(prim) == x_index
    assert registry.ETP_Y_OUTVAR_INDICES[prim] == registry.get_y_outvar_index(prim) == 0
    assert callable(registry.ETP_TRAINABLE_INVARS_FNS[prim])
    for table in (
        registry.ETP_RULES_YW_TO_W,
        registry.ETP_RULES_XY_TO_DW,
        registry.ETP_RULES_INIT_DRTRL,
        registry.ETP_RULES_INIT_PP,
    ):
        assert callable(table[prim])
    for slot in ("xy_to_trace", "trace_to_dw"):
        assert registry.has_rule(prim, slot) is (slot in extra)
    assert registry.get_batched_counterpart(prim) is counterpart


# Positional arguments of each rule slot (the Protocols of braintrace.contract).
_RULE_ARITY = dict(yw_to_w=2, xy_to_dw=3, init_drtrl=4, init_pp=4, xy_to_trace=3, trace_to_dw=2)


@all_cases
def test_builtin_rules_follow_the_slot_protocols(case):
    """Every installed rule takes its slot's positional arguments plus the eqn params."""
    x, w, fr = case.make(F32)
    eqn = etp_eqn(lambda w: case.op(x, w, fr), w)
    prim, params = eqn.primitive, dict(eqn.params)
    for slot in RULE_SLOTS:
        if not registry.has_rule(prim, slot):
            continue
        sig = inspect.signature(registry.get_rule(prim, slot))
        kwargs = params if slot not in ("init_drtrl", "init_pp") else {}
        if slot == "input_entries":  # the equation's operands, then the index
            sig.bind(*[None] * len(eqn.invars), input_index=None, **kwargs)
            continue
        sig.bind(*[None] * _RULE_ARITY[slot], **kwargs)  # raises TypeError if not
        assert not {"hidden_dim", "num_hidden_state"} & set(sig.parameters), slot


@pytest.mark.parametrize(
    "fn,ref",
    [
        (jax.nn.sigmoid, lambda w: 1 / (1 + np.exp(-w))),
        (lambda w: jnp.where(w > 0, w, 0.1 * w), lambda w: np.where(w > 0, w, 0.1 * w)),
        (lambda w: jnp.clip(w, -0.5, 0.5), lambda w: np.clip(w, -0.5, 0.5)),
        (lambda w: w.reshape(-1, 1).reshape(w.shape) ** 2, lambda w: w**2),
    ],
    ids=["sigmoid", "leaky", "clip", "reshape-roundtrip"],
)
def test_elemwise_accepts_per_position_maps(fn, ref):
    w = randn(0, (2, OUT), F64)
    np.testing.assert_allclose(ops.elemwise(w, fn), ref(np.asarray(w)), rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(lambda w: ops.elemwise(w, fn))(w), ref(np.asarray(w)), rtol=1e-12
    )


def test_plain_jax_primitives_are_not_etp():
    for p in (lax.dot_general_p, lax.add_p, lax.mul_p):
        assert not registry.is_etp_primitive(p)
    with pytest.raises(KeyError, match="not a registered ETP primitive"):
        registry.get_x_invar_index(lax.dot_general_p)


@all_cases
def test_trainable_and_x_invars_point_at_the_operands(case):
    x, w, fr = case.make(F32)
    names = sorted(w)
    f = lambda x, fr, *vals: case.op(x, dict(zip(names, vals)), fr)  # noqa: E731
    closed = jax.make_jaxpr(f)(x, fr, *[w[n] for n in names])
    n_lead = len(jax.tree_util.tree_leaves((x, fr)))
    var_of = dict(zip(names, closed.jaxpr.invars[n_lead:]))
    eqn = etp_eqn(f, x, fr, *[w[n] for n in names])
    trainables = registry.get_trainable_invars(eqn.primitive, eqn.params)
    assert set(trainables) == set(names)
    for n, idx in trainables.items():
        assert eqn.invars[idx] is var_of[n], n
    x_index = registry.get_x_invar_index(eqn.primitive)
    if case.has_x:
        assert eqn.invars[x_index] is closed.jaxpr.invars[0]
    else:
        assert x_index is None
    assert registry.get_y_outvar_index(eqn.primitive) == 0


# -- 7. bad input ------------------------------------------------------------------------


def f32(*shape):
    return jnp.ones(shape, F32)


def _roll(w):
    return jnp.roll(w, 1)


_DENSE, _LORA, _ELEM = (
    r"braintrace\.ops\.dense: ",
    r"braintrace\.ops\.lora: ",
    r"braintrace\.ops\.elemwise: ",
)
A, Bw = (IN, R), (R, OUT)
BAD_INPUT = [
    (
        "dense-x-rank",
        lambda: ops.dense(f32(2, 2, IN), f32(IN, OUT)),
        ValueError,
        _DENSE + r"x must be \(in,\) or \(batch, in\), got shape \(2, 2, 4\)",
    ),
    (
        "dense-weight-rank",
        lambda: ops.dense(f32(IN), f32(IN)),
        ValueError,
        _DENSE + r"weight must be 2-D \(in, out\)",
    ),
    (
        "dense-in-mismatch",
        lambda: ops.dense(f32(IN + 1), f32(IN, OUT)),
        ValueError,
        _DENSE + r"x's last axis must match weight's 'in' axis \(in_out\): expected 4, got 5",
    ),
    (
        "dense-out_in-mismatch",
        lambda: ops.dense(f32(IN), f32(IN, OUT), weight_layout="out_in"),
        ValueError,
        _DENSE + r".*\(out_in\): expected 5, got 4",
    ),
    (
        "dense-bias-shape",
        lambda: ops.dense(f32(IN), f32(IN, OUT), f32(OUT + 1)),
        ValueError,
        _DENSE + r"bias must have shape \(5,\)",
    ),
    (
        "dense-dtypes",
        lambda: ops.dense(f32(IN), jnp.ones((IN, OUT), F64)),
        TypeError,
        _DENSE + r"operands have different dtypes \(x: float32, weight: float64\)",
    ),
    (
        "dense-int",
        lambda: ops.dense(jnp.ones(IN, jnp.int32), f32(IN, OUT)),
        TypeError,
        _DENSE + r"x must have a floating dtype, got int32",
    ),
    (
        "dense-int-dtype-arg",
        lambda: ops.dense(f32(IN), f32(IN, OUT), dtype=jnp.int32),
        TypeError,
        _DENSE + r"dtype must be a floating dtype",
    ),
    (
        "dense-layout",
        lambda: ops.dense(f32(IN), f32(IN, OUT), weight_layout="io"),
        ValueError,
        _DENSE + r"weight_layout must be one of \('in_out', 'out_in'\), got 'io'",
    ),
    (
        "dense-unknown-kw",
        lambda: ops.dense(f32(IN), f32(IN, OUT), use_bias=True),
        TypeError,
        _DENSE + r"got an unexpected keyword argument 'use_bias'; expected dense\(x",
    ),
    (
        "dense-missing",
        lambda: ops.dense(f32(IN)),
        TypeError,
        _DENSE + r"missing a required argument: 'weight'",
    ),
    (
        "dense-none-weight",
        lambda: ops.dense(f32(IN), None),
        TypeError,
        _DENSE + r"weight is required",
    ),
    (
        "dense-not-array",
        lambda: ops.dense("abc", f32(IN, OUT)),
        TypeError,
        _DENSE + r"x must be an array, got str",
    ),
    (
        "lora-x-rank",
        lambda: ops.lora(f32(1, 1, IN), f32(*A), f32(*Bw)),
        ValueError,
        _LORA + r"x must be \(in,\) or \(batch, in\)",
    ),
    (
        "lora-a-rank",
        lambda: ops.lora(f32(IN), f32(IN), f32(*Bw)),
        ValueError,
        _LORA + r"lora_a must be 2-D \(in, r\)",
    ),
    (
        "lora-b-rank",
        lambda: ops.lora(f32(IN), f32(*A), f32(OUT)),
        ValueError,
        _LORA + r"lora_b must be 2-D \(r, out\)",
    ),
    (
        "lora-rank-mismatch",
        lambda: ops.lora(f32(IN), f32(*A), f32(R + 1, OUT)),
        ValueError,
        _LORA + r"lora_b's 'r' axis must match lora_a's rank: expected 2, got 3",
    ),
    (
        "lora-in-mismatch",
        lambda: ops.lora(f32(IN + 1), f32(*A), f32(*Bw)),
        ValueError,
        _LORA + r"x's last axis must match lora_a's 'in' axis: expected 4, got 5",
    ),
    (
        "lora-bias-shape",
        lambda: ops.lora(f32(IN), f32(*A), f32(*Bw), f32(IN)),
        ValueError,
        _LORA + r"bias must have shape \(5,\)",
    ),
    (
        "lora-base-shape",
        lambda: ops.lora(f32(IN), f32(*A), f32(*Bw), base_weight=f32(OUT, IN)),
        ValueError,
        _LORA + r"base_weight must have shape \(4, 5\) \(in, out\)",
    ),
    (
        "lora-dtypes",
        lambda: ops.lora(f32(IN), f32(*A), jnp.ones(Bw, F64)),
        TypeError,
        _LORA + r"operands have different dtypes",
    ),
    (
        "lora-int",
        lambda: ops.lora(f32(IN), jnp.ones(A, jnp.int32), f32(*Bw)),
        TypeError,
        _LORA + r"lora_a must have a floating dtype, got int32",
    ),
    (
        "lora-unknown-kw",
        lambda: ops.lora(f32(IN), f32(*A), f32(*Bw), rank=2),
        TypeError,
        _LORA + r"got an unexpected keyword argument 'rank'; expected lora\(",
    ),
    (
        "lora-traced-scale",
        lambda: jax.jit(lambda s: ops.lora(f32(IN), f32(*A), f32(*Bw), scale=s))(0.5),
        TypeError,
        _LORA + r"scale must be a static Python float",
    ),
    (
        "elemwise-fn-not-callable",
        lambda: ops.elemwise(f32(OUT), 3),
        TypeError,
        _ELEM + r"fn must be callable or None, got int",
    ),
    (
        "elemwise-fn-reduces",
        lambda: ops.elemwise(f32(OUT), jnp.sum),
        ValueError,
        _ELEM + r"fn must be elementwise \(same output shape as weight \(5,\)\), got \(\)",
    ),
    (
        "elemwise-fn-slices",
        lambda: ops.elemwise(f32(OUT), lambda w: w[:2]),
        ValueError,
        _ELEM + r"fn must be elementwise",
    ),
    # shape-preserving maps that mix positions: the rules' diagonal trace would be wrong
    (
        "elemwise-fn-cumsum",
        lambda: ops.elemwise(f32(OUT), jnp.cumsum),
        ValueError,
        _ELEM + r"fn must be elementwise \(each output entry .*\['cumsum'\]",
    ),
    (
        "elemwise-fn-softmax",
        lambda: ops.elemwise(f32(OUT), jax.nn.softmax),
        ValueError,
        _ELEM + r"fn must be elementwise .*'reduce_sum'",
    ),
    (
        "elemwise-fn-flip",
        lambda: ops.elemwise(f32(OUT), jnp.flip),
        ValueError,
        _ELEM + r"fn must be elementwise .*\['rev'\]",
    ),
    (
        "elemwise-fn-roll-in-jit",
        lambda: jax.jit(lambda w: ops.elemwise(w, _roll))(f32(OUT)),
        ValueError,
        _ELEM + r"fn must be elementwise .*'slice'",
    ),
    (
        "elemwise-int",
        lambda: ops.elemwise(jnp.ones(OUT, jnp.int32)),
        TypeError,
        _ELEM + r"weight must have a floating dtype",
    ),
    (
        "elemwise-unknown-kw",
        lambda: ops.elemwise(f32(OUT), func=jnp.tanh),
        TypeError,
        _ELEM + r"got an unexpected keyword argument 'func'; expected elemwise\(",
    ),
]


@pytest.mark.parametrize(
    "thunk,exc,match", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT]
)
def test_bad_input_names_the_op(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_lora_dtype_casts_inside_the_op():
    """``dtype=`` computes in that dtype while the trainables reach the op raw."""
    x = jnp.linspace(-1.0, 1.0, 3, dtype=jnp.float64)
    a = jnp.arange(6, dtype=jnp.float32).reshape(3, 2) / 7
    b = jnp.arange(8, dtype=jnp.float32).reshape(2, 4) / 5
    y = ops.lora(x, a, b, scale=0.5, dtype=jnp.float64)
    expected = 0.5 * (x @ a.astype(jnp.float64)) @ b.astype(jnp.float64)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-12)
    jaxpr = jax.make_jaxpr(lambda a: ops.lora(x, a, b, scale=0.5, dtype=jnp.float64))(a)
    eqn = next(e for e in jaxpr.jaxpr.eqns if registry.is_etp_primitive(e.primitive))
    assert eqn.invars[1] is jaxpr.jaxpr.invars[0]  # lora_a reaches the op uncast
    h = jnp.array([1.0, -2.0, 0.5, 3.0])
    dw = registry.get_rule(eqn.primitive, "xy_to_dw")(
        x, h, {"lora_a": a, "lora_b": b}, **eqn.params
    )
    _, vjp = jax.vjp(lambda a_, b_: ops.lora(x, a_, b_, scale=0.5, dtype=jnp.float64), a, b)
    da, db = vjp(h)
    assert dw["lora_a"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dw["lora_a"]), np.asarray(da), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dw["lora_b"]), np.asarray(db), rtol=1e-6)
    with pytest.raises(TypeError, match="braintrace.ops.lora"):
        ops.lora(x, a, b)  # mixed dtypes without dtype=
