"""The seed contract: :class:`ETPPrimitive` and :func:`register_primitive`.

From one ``impl_fn`` written with ``jax.numpy``, :func:`register_primitive` makes a
JAX primitive that works under every transformation (eager, ``jit``, ``grad``,
``jvp``, ``linear_transpose``, ``vmap``, ``eval_shape``) while staying a single,
recognisable equation in the jaxpr. That equation is what the compiler looks for:
the primitive object is the key, never its name. What the compiler and learner
know about the op is its :class:`~braintrace.contract.OpContract`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import batched_twin, registry
from .contract import (
    InitDrtrl,
    InitPp,
    InputEntries,
    InvarsFn,
    OpContract,
    TraceToDw,
    XToInputTrace,
    XyToDw,
    XyToTrace,
    YwToW,
)
from .user_frame import warn_at_user

__all__ = ["ETPPrimitive", "ETPIdentityWarning", "register_primitive", "compiling"]


class ETPIdentityWarning(UserWarning):
    """An ETP op lost its identity while the compiler traced a step (it became plain jnp).

    Only a step being compiled loses anything when an op dissolves (the compiler no
    longer sees it, so its parameters get no trace); everywhere else, including the
    learner's own evaluation of a vmapped ensemble, the dissolved op computes the
    same values and nothing is reported.
    """


_COMPILING: contextvars.ContextVar[int] = contextvars.ContextVar("braintrace_compiling", default=0)


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Mark the tracing of a step by the compiler: ops dissolving under it warn.

    Examples
    --------
    >>> import warnings, jax, jax.numpy as jnp
    >>> from braintrace import ops, primitive
    >>> ws = jnp.ones((2, 3, 4))
    >>> with primitive.compiling(), warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     _ = jax.vmap(lambda w: ops.dense(jnp.ones(3), w))(ws)
    >>> [w.category.__name__ for w in seen]
    ['ETPIdentityWarning']
    """
    token = _COMPILING.set(_COMPILING.get() + 1)
    try:
        yield
    finally:
        _COMPILING.reset(token)


class ETPPrimitive(Primitive):
    """A JAX primitive that the braintrace compiler treats as a trainable op.

    Create one with :func:`register_primitive`; then install its eligibility-trace
    rules with :meth:`register_etp_rules` (or the ``register_*`` methods). Each
    installation replaces :attr:`contract` with an updated copy.

    Attributes
    ----------
    impl_fn : callable
        The plain-``jax.numpy`` implementation, ``impl_fn(*operands, **params)``.
    contract : OpContract
        The op's metadata and rules (frozen; read-only attribute).
    batched : bool
        Whether ``x`` and ``y`` carry a leading batch axis.
    """

    def __init__(self, name: str, impl_fn: Callable, contract: OpContract):
        super().__init__(name)
        self.impl_fn = impl_fn
        self._contract = contract

    def __repr__(self) -> str:
        return f"ETPPrimitive({self.name!r})"

    @property
    def contract(self) -> OpContract:
        """The op's frozen :class:`~braintrace.contract.OpContract`."""
        return self._contract

    @property
    def batched(self) -> bool:
        """Whether ``x`` and ``y`` carry a leading batch axis (``contract.batched``)."""
        return self._contract.batched

    @property
    def multiple_results(self) -> bool:  # read by JAX
        return self._contract.multiple_results

    def _update_contract(self, **changes: Any) -> None:
        self._contract = dataclasses.replace(self._contract, **changes)

    # -- rule installation ---------------------------------------------------
    def _install(self, **rules: Callable) -> None:
        owner = f"ETP primitive {self.name!r}"
        self._contract = self._contract.with_rules(owner=owner, **rules)

    def register_yw_to_w(self, fn: YwToW) -> YwToW:
        """Install ``fn(output_vector, trace, **params) -> trace``. Usable as a decorator."""
        self._install(yw_to_w=fn)
        return fn

    def register_xy_to_dw(self, fn: XyToDw) -> XyToDw:
        """Install ``fn(x, y_cotangent, w, **params) -> dw``. Usable as a decorator."""
        self._install(xy_to_dw=fn)
        return fn

    def register_init_drtrl(self, fn: InitDrtrl) -> InitDrtrl:
        """Install ``fn(x_var, y_var, weight_var, num_states) -> trace zeros``."""
        self._install(init_drtrl=fn)
        return fn

    def register_init_pp(self, fn: InitPp) -> InitPp:
        """Install ``fn(x_var, y_var, weight_var, num_states) -> output-trace zeros``."""
        self._install(init_pp=fn)
        return fn

    def register_xy_to_trace(self, fn: XyToTrace) -> XyToTrace:
        """Install the optional D-RTRL instantaneous term in trace space."""
        self._install(xy_to_trace=fn)
        return fn

    def register_trace_to_dw(self, fn: TraceToDw) -> TraceToDw:
        """Install the optional linear map from a contracted trace to ``dw``."""
        self._install(trace_to_dw=fn)
        return fn

    def register_input_entries(self, fn: InputEntries) -> InputEntries:
        """Install the optional input-Jacobian entries (read by ``SnAp1``)."""
        self._install(input_entries=fn)
        return fn

    def register_x_to_input_trace(self, fn: XToInputTrace) -> XToInputTrace:
        """Install the optional map from ``x`` to pp_prop's input-trace space."""
        self._install(x_to_input_trace=fn)
        return fn

    def register_etp_rules(
        self,
        *,
        yw_to_w: YwToW | None = None,
        xy_to_dw: XyToDw | None = None,
        init_drtrl: InitDrtrl | None = None,
        init_pp: InitPp | None = None,
        xy_to_trace: XyToTrace | None = None,
        trace_to_dw: TraceToDw | None = None,
        input_entries: InputEntries | None = None,
        x_to_input_trace: XToInputTrace | None = None,
    ) -> ETPPrimitive:
        """Install several rules at once; an argument left ``None`` is skipped.

        All are checked before any is installed. Returns the primitive, so
        registration can be chained.

        Examples
        --------
        >>> import jax.numpy as jnp, braintrace
        >>> p = braintrace.register_primitive('etp_doc_scale', lambda x, w: x * w)
        >>> p = p.register_etp_rules(yw_to_w=lambda v, t, **params: {'weight': t['weight'] * v})
        >>> braintrace.registry.has_rule(p, 'yw_to_w'), braintrace.registry.has_rule(p, 'init_pp')
        (True, False)
        """
        given = dict(
            yw_to_w=yw_to_w,
            xy_to_dw=xy_to_dw,
            init_drtrl=init_drtrl,
            init_pp=init_pp,
            xy_to_trace=xy_to_trace,
            trace_to_dw=trace_to_dw,
            input_entries=input_entries,
            x_to_input_trace=x_to_input_trace,
        )
        self._install(**{slot: fn for slot, fn in given.items() if fn is not None})
        return self


def register_primitive(
    name: str,
    impl_fn: Callable,
    *,
    batched: bool = False,
    gradient_enabled: bool = False,
    trainable_invars_fn: InvarsFn | None = None,
    frozen_invars_fn: InvarsFn | None = None,
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
    contract = OpContract(
        batched=bool(batched),
        gradient_enabled=bool(gradient_enabled),
        trainable_invars_fn=trainable_invars_fn,
        frozen_invars_fn=frozen_invars_fn,
        x_invar_index=x_invar_index,
        y_outvar_index=y_outvar_index,
        multiple_results=bool(multiple_results),
        batched_counterpart=batched_counterpart,
    )
    _check_registration(name, impl_fn, contract, replace)
    prim = ETPPrimitive(name, impl_fn, contract)
    _install_transformations(prim)
    registry.claim(prim, replace=replace)
    if _derives_twin(contract):
        twin = _derive_batched_counterpart(prim, replace=replace)
        prim._update_contract(batched_counterpart=twin, counterpart_is_derived=True)
    return prim


# -- registration checks: all run before anything is registered -------------------


def _derives_twin(contract: OpContract) -> bool:
    """An unbatched op with an input and no explicit counterpart gets a derived twin."""
    return (
        not contract.batched
        and contract.x_invar_index is not None
        and contract.batched_counterpart is None
    )


def _check_registration(name: str, impl_fn: Any, contract: OpContract, replace: bool) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_primitive: name must be a non-empty str, got {name!r}.")
    where = f"register_primitive({name!r})"
    if not callable(impl_fn):
        raise TypeError(f"{where}: impl_fn must be callable, got {type(impl_fn).__name__}.")
    for arg in ("trainable_invars_fn", "frozen_invars_fn"):
        fn = getattr(contract, arg)
        if fn is not None and not callable(fn):
            raise TypeError(
                f"{where}: {arg} must be callable (params -> {{name: invar_index}}) or None."
            )
    _check_indices(where, contract)
    _check_counterpart(where, contract)
    if _derives_twin(contract):
        _check_twin_name_is_free(name, where, replace)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and value >= 0


def _check_indices(where: str, contract: OpContract) -> None:
    x_index, y_index = contract.x_invar_index, contract.y_outvar_index
    if x_index is not None and not _is_index(x_index):
        raise TypeError(
            f"{where}: x_invar_index must be a non-negative int or None, got {x_index!r}."
        )
    if not _is_index(y_index):
        raise TypeError(f"{where}: y_outvar_index must be a non-negative int, got {y_index!r}.")
    if y_index and not contract.multiple_results:
        raise ValueError(f"{where}: y_outvar_index={y_index} needs multiple_results=True.")


def _check_counterpart(where: str, contract: OpContract) -> None:
    counterpart = contract.batched_counterpart
    if counterpart is None:
        return
    if contract.batched:
        raise ValueError(f"{where}: a batched primitive has no batched_counterpart.")
    if not registry.is_batched(counterpart):
        raise ValueError(
            f"{where}: batched_counterpart must be a registered batched ETP primitive."
        )


def _check_twin_name_is_free(name: str, where: str, replace: bool) -> None:
    # Refuse before claiming ``name``: a clash found while deriving the twin would
    # otherwise leave this primitive half-registered. Replacing ``name`` frees the
    # old twin's name; ``replace=True`` also allows taking over a foreign one.
    twin_name = name + "_batched"
    if replace or name in registry.BY_NAME or twin_name not in registry.BY_NAME:
        return
    raise ValueError(
        f"{where}: its derived batched counterpart would be named {twin_name!r}, but an "
        "ETP primitive with that name is already registered; choose another name, pass "
        "batched_counterpart=..., or pass replace=True."
    )


# -- derived batched counterpart ---------------------------------------------


def _derive_batched_counterpart(unbatched: ETPPrimitive, *, replace: bool) -> ETPPrimitive:
    """Register ``<name>_batched``: ``unbatched`` mapped over ``x``, with vmapped rules.

    The twin's rules look the unbatched rules up at call time, so rules installed
    on the unbatched primitive after registration are picked up.
    """
    c = unbatched.contract
    twin = register_primitive(
        unbatched.name + "_batched",
        batched_twin.twin_impl(unbatched),
        batched=True,
        gradient_enabled=c.gradient_enabled,
        trainable_invars_fn=c.trainable_invars_fn,
        frozen_invars_fn=c.frozen_invars_fn,
        x_invar_index=c.x_invar_index,
        y_outvar_index=c.y_outvar_index,
        multiple_results=c.multiple_results,
        replace=replace,
    )
    return twin.register_etp_rules(**batched_twin.twin_rules(unbatched))


# -- transformations -----------------------------------------------------------


def _install_transformations(prim: ETPPrimitive) -> None:
    impl_fn, x_index, mr = prim.impl_fn, prim.contract.x_invar_index, prim.multiple_results

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
    if _COMPILING.get():
        warn_at_user(
            f"ETP op {prim.name!r} cannot stay an ETP primitive under jax.vmap ({why}); it "
            "is computed as plain jax.numpy here and the braintrace compiler will not see "
            "it, so its parameters get no eligibility trace. Vmap over the op's input x "
            "only (weights unbatched) to keep it traceable. (A vmapped lax.cond/switch "
            "batches the weights its branches close over: compile the step per sample, "
            "batched=False, and vmap the learner, or call the op outside the branch.)",
            ETPIdentityWarning,
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
