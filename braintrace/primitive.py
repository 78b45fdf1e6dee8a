"""The seed contract: :class:`ETPPrimitive` and :func:`register_primitive`.

From one ``impl_fn`` written with ``jax.numpy``, :func:`register_primitive` makes a
JAX primitive that works under every transformation (eager, ``jit``, ``grad``,
``jvp``, ``linear_transpose``, ``vmap``, ``eval_shape``) while staying a single,
recognisable equation in the jaxpr. That equation is what the compiler looks for:
the primitive object is the key, never its name.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import registry

__all__ = ["ETPPrimitive", "ETPIdentityWarning", "register_primitive"]


class ETPIdentityWarning(UserWarning):
    """An ETP op lost its identity under a transformation (it became plain jnp)."""


def _check_rule(prim_name: str, slot: str, fn: Any) -> Callable:
    if not callable(fn):
        raise TypeError(
            f"ETP primitive {prim_name!r}: the {slot!r} rule must be callable, got "
            f"{type(fn).__name__}."
        )
    return fn


class ETPPrimitive(Primitive):
    """A JAX primitive that the braintrace compiler treats as a trainable op.

    Create one with :func:`register_primitive`; then install its eligibility-trace
    rules with :meth:`register_etp_rules` (or the four ``register_*`` methods).

    Attributes
    ----------
    impl_fn : callable
        The plain-``jax.numpy`` implementation, ``impl_fn(*operands, **params)``.
    batched : bool
        Whether ``x`` and ``y`` carry a leading batch axis.
    """

    def __init__(self, name: str, impl_fn: Callable, *, batched: bool, multiple_results: bool):
        super().__init__(name)
        self.impl_fn = impl_fn
        self.batched = batched
        self.multiple_results = multiple_results

    def __repr__(self) -> str:
        return f"ETPPrimitive({self.name!r})"

    # -- rule installation ---------------------------------------------------
    def _install(self, slot: str, fn: Callable) -> Callable:
        registry.RULE_TABLES[slot][self] = _check_rule(self.name, slot, fn)
        return fn

    def register_yw_to_w(self, fn: Callable) -> Callable:
        """Install ``fn(hidden_dim, trace, **params) -> trace``. Usable as a decorator."""
        return self._install("yw_to_w", fn)

    def register_xy_to_dw(self, fn: Callable) -> Callable:
        """Install ``fn(x, hidden_dim, w, **params) -> dw``. Usable as a decorator."""
        return self._install("xy_to_dw", fn)

    def register_init_drtrl(self, fn: Callable) -> Callable:
        """Install ``fn(x_var, y_var, weight_var, num_hidden_state) -> trace``."""
        return self._install("init_drtrl", fn)

    def register_init_pp(self, fn: Callable) -> Callable:
        """Install ``fn(x_var, y_var, weight_var, num_hidden_state) -> zeros``."""
        return self._install("init_pp", fn)

    def register_xy_to_trace(self, fn: Callable) -> Callable:
        """Install the optional D-RTRL instantaneous term in trace space."""
        return self._install("xy_to_trace", fn)

    def register_trace_to_dw(self, fn: Callable) -> Callable:
        """Install the optional linear map from a contracted trace to ``dw``."""
        return self._install("trace_to_dw", fn)

    def register_etp_rules(
        self,
        *,
        yw_to_w: Callable | None = None,
        xy_to_dw: Callable | None = None,
        init_drtrl: Callable | None = None,
        init_pp: Callable | None = None,
        xy_to_trace: Callable | None = None,
        trace_to_dw: Callable | None = None,
    ) -> ETPPrimitive:
        """Install several rules at once; an argument left ``None`` is skipped.

        Returns the primitive, so registration can be chained.
        """
        given = dict(
            yw_to_w=yw_to_w,
            xy_to_dw=xy_to_dw,
            init_drtrl=init_drtrl,
            init_pp=init_pp,
            xy_to_trace=xy_to_trace,
            trace_to_dw=trace_to_dw,
        )
        given = {slot: fn for slot, fn in given.items() if fn is not None}
        for slot, fn in given.items():  # validate all first: install all or nothing
            _check_rule(self.name, slot, fn)
        for slot, fn in given.items():
            self._install(slot, fn)
        return self


def register_primitive(
    name: str,
    impl_fn: Callable,
    *,
    batched: bool = False,
    gradient_enabled: bool = False,
    trainable_invars_fn: Callable[[Mapping[str, Any]], Mapping[str, int]] | None = None,
    frozen_invars_fn: Callable[[Mapping[str, Any]], Mapping[str, int]] | None = None,
    x_invar_index: int | None = 0,
    y_outvar_index: int = 0,
    multiple_results: bool = False,
    batched_counterpart: ETPPrimitive | None = None,
    replace: bool = False,
) -> ETPPrimitive:
    """Create an ETP primitive from a plain implementation and register it.

    Installs, from ``impl_fn`` alone: the eager implementation, abstract evaluation
    (via :func:`jax.eval_shape`), the MLIR lowering, a JVP rule (so reverse mode
    works through JAX's transpose of the JVP), a transpose rule (for
    :func:`jax.linear_transpose` over the operands the op is linear in) and a
    batching rule that keeps the op an ETP primitive under :func:`jax.vmap`.

    Parameters
    ----------
    name : str
        Unique primitive name (shown in jaxprs).
    impl_fn : callable
        ``impl_fn(*operands, **params) -> y`` in ``jax.numpy``. ``params`` are the
        static keyword arguments given to ``bind``.
    batched : bool
        ``True`` if ``x`` and ``y`` have a leading batch axis and ``impl_fn`` treats
        its rows independently.
    gradient_enabled : bool
        ``True`` for identity-like ops the compiler should differentiate through
        when it walks from another op's output to a hidden state.
    trainable_invars_fn : callable, optional
        ``fn(params) -> {name: operand_index}`` naming the trainable operands.
        ``None`` means ``{'weight': 1}``.
    frozen_invars_fn : callable, optional
        ``fn(params) -> {name: operand_index}`` naming non-trainable operands the
        rules need (a mask): they reach every rule inside ``w`` next to the
        trainables and get no gradient. They must be constants of the step or
        ``params`` leaves (time-invariant), which the compiler checks.
    x_invar_index : int or None
        Operand index of the input ``x``; ``None`` for ops without an input.
    y_outvar_index : int
        Result index of ``y`` when ``multiple_results`` is true.
    multiple_results : bool
        Whether ``impl_fn`` returns a tuple of arrays.
    batched_counterpart : ETPPrimitive, optional
        For an unbatched op, the batched primitive that ``vmap`` over ``x``
        rebinds. If omitted (and ``x_invar_index`` is not ``None``), one is derived
        from ``impl_fn`` and registered as ``name + '_batched'`` with rules derived
        from this primitive's.
    replace : bool
        Allow replacing a primitive already registered under ``name``.

    Returns
    -------
    ETPPrimitive

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace
    >>> def my_impl(x, w):
    ...     return x @ w
    >>> my_p = braintrace.register_primitive('etp_doc_mm', my_impl, batched=True)
    >>> my_p.bind(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_primitive: name must be a non-empty str, got {name!r}.")
    if not callable(impl_fn):
        raise TypeError(
            f"register_primitive({name!r}): impl_fn must be callable, got "
            f"{type(impl_fn).__name__}."
        )
    if trainable_invars_fn is not None and not callable(trainable_invars_fn):
        raise TypeError(
            f"register_primitive({name!r}): trainable_invars_fn must be callable "
            "(params -> {name: invar_index}) or None."
        )
    if frozen_invars_fn is not None and not callable(frozen_invars_fn):
        raise TypeError(
            f"register_primitive({name!r}): frozen_invars_fn must be callable "
            "(params -> {name: invar_index}) or None."
        )
    if x_invar_index is not None and (not isinstance(x_invar_index, int) or x_invar_index < 0):
        raise TypeError(
            f"register_primitive({name!r}): x_invar_index must be a non-negative int or "
            f"None, got {x_invar_index!r}."
        )
    if not isinstance(y_outvar_index, int) or y_outvar_index < 0:
        raise TypeError(
            f"register_primitive({name!r}): y_outvar_index must be a non-negative int, "
            f"got {y_outvar_index!r}."
        )
    if y_outvar_index and not multiple_results:
        raise ValueError(
            f"register_primitive({name!r}): y_outvar_index={y_outvar_index} needs "
            "multiple_results=True."
        )
    if batched and batched_counterpart is not None:
        raise ValueError(
            f"register_primitive({name!r}): a batched primitive has no batched_counterpart."
        )
    if batched_counterpart is not None and not registry.is_batched(batched_counterpart):
        raise ValueError(
            f"register_primitive({name!r}): batched_counterpart must be a registered "
            "batched ETP primitive."
        )

    derives_twin = not batched and x_invar_index is not None and batched_counterpart is None
    twin_name = name + "_batched"
    clash = not replace and name not in registry._BY_NAME and twin_name in registry._BY_NAME
    if derives_twin and clash:
        # Refuse before claiming ``name``: a clash found while deriving the twin
        # would otherwise leave this primitive half-registered.
        raise ValueError(
            f"register_primitive({name!r}): its derived batched counterpart would be "
            f"named {twin_name!r}, but an ETP primitive with that name is already "
            "registered; choose another name, pass batched_counterpart=..., or pass "
            "replace=True."
        )

    prim = ETPPrimitive(name, impl_fn, batched=batched, multiple_results=multiple_results)
    old = registry._BY_NAME.get(name)
    registry._claim_name(name, prim, replace)
    if old is not None and getattr(old, "_derived_counterpart", None) is not None:
        registry._forget(old._derived_counterpart)

    _install_transformations(prim, impl_fn, x_invar_index)

    registry.ETP_PRIMITIVES.add(prim)
    if batched:
        registry.BATCHED_PRIMITIVES.add(prim)
    if gradient_enabled:
        registry.GRADIENT_ENABLED_PRIMITIVES.add(prim)
    registry.ETP_TRAINABLE_INVARS_FNS[prim] = trainable_invars_fn
    registry.ETP_FROZEN_INVARS_FNS[prim] = frozen_invars_fn
    registry.ETP_X_INVAR_INDICES[prim] = x_invar_index
    registry.ETP_Y_OUTVAR_INDICES[prim] = y_outvar_index

    prim._derived_counterpart = None
    if not batched and x_invar_index is not None:
        if batched_counterpart is None:
            batched_counterpart = _derive_batched_counterpart(
                prim,
                gradient_enabled=gradient_enabled,
                trainable_invars_fn=trainable_invars_fn,
                frozen_invars_fn=frozen_invars_fn,
                x_invar_index=x_invar_index,
                y_outvar_index=y_outvar_index,
                replace=replace,
            )
            prim._derived_counterpart = batched_counterpart
        registry.BATCHED_COUNTERPARTS[prim] = batched_counterpart
    return prim


# -- transformations -----------------------------------------------------------


def _install_transformations(prim: ETPPrimitive, impl_fn: Callable, x_index: int | None) -> None:
    mr = prim.multiple_results

    def impl(*args, **params):
        return impl_fn(*args, **params)

    def abstract_eval(*avals, **params):
        structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
        out = jax.eval_shape(functools.partial(impl_fn, **params), *structs)
        to_aval = lambda s: jax.core.ShapedArray(s.shape, s.dtype)  # noqa: E731
        if mr:
            return tuple(to_aval(s) for s in out)
        return to_aval(out)

    def jvp(primals, tangents, **params):
        out = prim.bind(*primals, **params)
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        _, t_out = jax.jvp(functools.partial(impl_fn, **params), tuple(primals), tuple(tangents))
        return out, t_out

    def transpose(ct, *args, **params):
        # The op is linear in the operands being transposed (the caller of
        # linear_transpose guarantees it), so its transpose is the VJP at zero.
        linear = [i for i, a in enumerate(args) if ad.is_undefined_primal(a)]

        def on_linear(*lin_vals):
            full = list(args)
            for i, v in zip(linear, lin_vals):
                full[i] = v
            return impl_fn(*full, **params)

        zeros = [jnp.zeros(args[i].aval.shape, args[i].aval.dtype) for i in linear]
        _, vjp_fn = jax.vjp(on_linear, *zeros)
        if mr:
            ct = tuple(ad.instantiate_zeros(c) for c in ct)
        else:
            ct = ad.instantiate_zeros(ct)
        cts = vjp_fn(ct)
        out = [None] * len(args)
        for i, c in zip(linear, cts):
            out[i] = c
        return out

    prim.def_impl(impl)
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(impl_fn, multiple_results=mr))
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = functools.partial(_batch_rule, prim, x_index)


def _dissolve(prim: ETPPrimitive, args, dims, params, why: str):
    warnings.warn(
        f"ETP op {prim.name!r} cannot stay an ETP primitive under jax.vmap ({why}); it "
        "is computed as plain jax.numpy here and the braintrace compiler will not see "
        "it, so its parameters get no eligibility trace. Vmap over the op's input x "
        "only (weights unbatched) to keep it traceable.",
        ETPIdentityWarning,
        stacklevel=2,
    )
    fn = functools.partial(prim.impl_fn, **params)
    out = jax.vmap(fn, in_axes=tuple(dims), out_axes=0)(*args)
    return out, ([0] * len(out) if prim.multiple_results else 0)


def _batch_rule(prim: ETPPrimitive, x_index: int | None, args, dims, **params):
    mapped = [i for i, d in enumerate(dims) if d is not None]
    if x_index is None:
        return _dissolve(prim, args, dims, params, "its trainable operand is batched")
    if mapped != [x_index]:
        return _dissolve(prim, args, dims, params, "an operand other than x is batched")
    args = list(args)
    x = jnp.moveaxis(args[x_index], dims[x_index], 0)
    if not prim.batched:
        counterpart = registry.get_batched_counterpart(prim)
        if counterpart is None:  # e.g. its counterpart was replaced or unregistered
            return _dissolve(prim, args, dims, params, "no batched counterpart is registered")
        args[x_index] = x
        out = counterpart.bind(*args, **params)
        return out, ([0] * len(out) if prim.multiple_results else 0)
    # Batched op under another vmap: fold the new axis into the op's batch axis.
    v, b = x.shape[0], x.shape[1]
    args[x_index] = x.reshape((v * b,) + x.shape[2:])
    out = prim.bind(*args, **params)
    unfold = lambda y: y.reshape((v, b) + y.shape[1:])  # noqa: E731
    if prim.multiple_results:
        return [unfold(y) for y in out], [0] * len(out)
    return unfold(out), 0


# -- derived batched counterpart ---------------------------------------------


def _add_batch(var: Any, size: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((size,) + tuple(var.shape), var.dtype)


def _drop_batch(var: Any) -> jax.ShapeDtypeStruct | None:
    if var is None:
        return None
    return jax.ShapeDtypeStruct(tuple(var.shape[1:]), var.dtype)


def _derive_batched_counterpart(
    unbatched: ETPPrimitive,
    *,
    gradient_enabled: bool,
    trainable_invars_fn,
    frozen_invars_fn,
    x_invar_index: int,
    y_outvar_index: int,
    replace: bool,
) -> ETPPrimitive:
    """A batched twin of ``unbatched`` whose rules vmap the unbatched rules.

    The twin's rules look the unbatched rules up at call time, so rules installed
    on the unbatched primitive after registration are picked up.
    """

    def impl(*args, **params):
        in_axes = [None] * len(args)
        in_axes[x_invar_index] = 0
        return jax.vmap(functools.partial(unbatched.impl_fn, **params), in_axes=tuple(in_axes))(
            *args
        )

    twin = register_primitive(
        unbatched.name + "_batched",
        impl,
        batched=True,
        gradient_enabled=gradient_enabled,
        trainable_invars_fn=trainable_invars_fn,
        frozen_invars_fn=frozen_invars_fn,
        x_invar_index=x_invar_index,
        y_outvar_index=y_outvar_index,
        multiple_results=unbatched.multiple_results,
        replace=replace,
    )
    rule = functools.partial(registry.get_rule, unbatched)
    sum0 = functools.partial(jax.tree_util.tree_map, lambda a: a.sum(0))

    def yw_to_w(hidden_dim, trace, **params):
        return jax.vmap(lambda h, t: rule("yw_to_w")(h, t, **params))(hidden_dim, trace)

    def xy_to_dw(x, hidden_dim, w, **params):
        per = jax.vmap(lambda a, h: rule("xy_to_dw")(a, h, w, **params))(x, hidden_dim)
        return sum0(per)

    def xy_to_trace(x, hidden_dim, w, **params):
        slot = "xy_to_trace" if registry.has_rule(unbatched, "xy_to_trace") else "xy_to_dw"
        return sum0(jax.vmap(lambda a, h: rule(slot)(a, h, w, **params))(x, hidden_dim))

    def trace_to_dw(dtrace, w, **params):
        if not registry.has_rule(unbatched, "trace_to_dw"):
            return dtrace
        return rule("trace_to_dw")(dtrace, w, **params)

    def _init(slot):
        def init(x_var, y_var, weight_var, num_hidden_state):
            size = x_var.shape[0]
            zeros = rule(slot)(_drop_batch(x_var), _drop_batch(y_var), weight_var, num_hidden_state)
            return jax.tree_util.tree_map(
                lambda z: jnp.zeros(_add_batch(z, size).shape, z.dtype), zeros
            )

        return init

    twin.register_etp_rules(
        yw_to_w=yw_to_w,
        xy_to_dw=xy_to_dw,
        init_drtrl=_init("init_drtrl"),
        init_pp=_init("init_pp"),
        xy_to_trace=xy_to_trace,
        trace_to_dw=trace_to_dw,
    )
    return twin
