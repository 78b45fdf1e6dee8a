"""An ETP op's contract: its metadata and trace rules in one frozen object.

Every :class:`~braintrace.ETPPrimitive` carries one :class:`OpContract`. The
metadata (which operands are trainable, where ``x`` and ``y`` sit, whether the op
is batched) is fixed by :func:`braintrace.register_primitive`; installing a rule
(``prim.register_yw_to_w(fn)``, ``prim.register_etp_rules(...)``) replaces the
contract with an updated copy. The module-level tables of
:mod:`braintrace.registry` are views derived from these objects.

Rule slots
----------
Each slot has a :class:`typing.Protocol` below documenting its arguments and
return value. The learner calls every rule positionally, so an implementation may
name its arguments as it likes. Shapes are the primitive's own: a batched op's
``x``, ``y``, output vectors and traces carry a leading batch axis, and its
gradient rules (``xy_to_dw``, ``xy_to_trace``) sum over that axis, as its VJP
does. ``w`` holds the trainables by name plus the frozen operands named by
``frozen_invars_fn`` (the rules must apply them, e.g. a mask). ``**params`` are
the equation's static keyword parameters (those given to ``bind``).

The four slots of the seed contract are ``yw_to_w``, ``xy_to_dw``, ``init_drtrl``
and ``init_pp``. Two optional slots let an op keep its D-RTRL trace in another
space than its trainables: LoRA keeps it on the effective weight ``W0 + s A B``,
smaller than a trace on ``A`` and ``B`` and still exact because the chain back to
``A`` and ``B`` is linear. The optional ``input_entries`` gives ``SnAp1`` the
op's own entry of a recurrent weight. The optional ``x_to_input_trace`` gives
pp_prop the space its input-side trace lives in (an embedding's one-hot rows).
The math behind the slots is in ``docs/algorithms.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

__all__ = [
    "OpContract",
    "RULE_SLOTS",
    "SEED_RULE_SLOTS",
    "InvarsFn",
    "YwToW",
    "XyToDw",
    "InitDrtrl",
    "InitPp",
    "XyToTrace",
    "TraceToDw",
    "InputEntries",
    "XToInputTrace",
    "check_rule",
    "takes_params",
]

#: A pytree of arrays keyed like the op's trainables (a trace, a gradient).
PyTree = Any
#: Abstract array: anything with ``.shape`` and ``.dtype`` (``jax.ShapeDtypeStruct``).
ShapeDtype = jax.ShapeDtypeStruct


class InvarsFn(Protocol):
    """Names some operands of one equation: ``fn(params) -> {name: operand_index}``.

    Parameters
    ----------
    params : mapping
        The equation's static keyword parameters (those given to ``bind``).

    Returns
    -------
    mapping
        Operand name to its index among the equation's operands (invars).
    """

    def __call__(self, params: Mapping[str, Any], /) -> Mapping[str, int]: ...


class YwToW(Protocol):
    """Scale a trace along the op's output axis by an output-shaped vector.

    The ``y -> W`` link: ``trace[..., i, k] * output_vector[..., k]`` for a dense
    op. The learner uses it to carry a trace through the state Jacobian and to
    contract a trace with the learning signal.

    Parameters
    ----------
    output_vector : Array
        ``y``-shaped factor, one value per output position (a diagonal Jacobian
        entry, a learning signal).
    trace : pytree
        One state's trace, keyed like ``init_drtrl``'s result without its trailing
        state axis (shape of the trainable, or of the trace space).
    **params
        The equation's static parameters.

    Returns
    -------
    pytree
        The scaled trace, same structure and shapes as ``trace``.
    """

    def __call__(self, output_vector: jax.Array, trace: PyTree, /, **params: Any) -> PyTree: ...


class XyToDw(Protocol):
    """The op's VJP with respect to its trainables.

    Parameters
    ----------
    x : Array or None
        The op's input (``None`` for an op registered with ``x_invar_index=None``).
    y_cotangent : Array
        ``y``-shaped cotangent of the op's output.
    w : dict
        Trainables (and frozen operands) by name.
    **params
        The equation's static parameters.

    Returns
    -------
    dict
        ``{name: d <y_cotangent, y> / d w[name]}`` for every trainable, summed over
        the batch axis of a batched op.
    """

    def __call__(
        self,
        x: jax.Array | None,
        y_cotangent: jax.Array,
        w: Mapping[str, jax.Array],
        /,
        **params: Any,
    ) -> dict[str, jax.Array]: ...


class InitDrtrl(Protocol):
    """Zeros of the op's D-RTRL trace.

    Parameters
    ----------
    x_var, y_var : ShapeDtypeStruct
        Abstract input (``None`` without one) and output of the equation.
    weight_var : dict
        Abstract trainables by name.
    num_states : int
        Number of hidden states ``S`` the op's output drives.
    **params
        Optional: a rule that accepts keyword arguments also receives the
        equation's static parameters (an einsum's ``spec`` fixes its trace's shape).

    Returns
    -------
    pytree
        Zeros, each leaf the trainable's (or trace space's) shape plus a trailing
        ``num_states`` axis, and a leading batch axis for a batched op.
    """

    def __call__(
        self,
        x_var: ShapeDtype | None,
        y_var: ShapeDtype,
        weight_var: Mapping[str, ShapeDtype],
        num_states: int,
        /,
    ) -> PyTree: ...


class InitPp(Protocol):
    """Zeros of pp_prop's output-side trace.

    Same arguments as :class:`InitDrtrl`; returns zeros of ``y_var``'s shape plus a
    trailing ``num_states`` axis.
    """

    def __call__(
        self,
        x_var: ShapeDtype | None,
        y_var: ShapeDtype,
        weight_var: Mapping[str, ShapeDtype],
        num_states: int,
        /,
    ) -> PyTree: ...


class XyToTrace(Protocol):
    """Optional: the instantaneous D-RTRL term in trace space.

    Same arguments as :class:`XyToDw`; returns a tree shaped like one state's
    trace. Without it the learner uses ``xy_to_dw`` (trace space = trainables).
    """

    def __call__(
        self,
        x: jax.Array | None,
        y_cotangent: jax.Array,
        w: Mapping[str, jax.Array],
        /,
        **params: Any,
    ) -> PyTree: ...


class TraceToDw(Protocol):
    """Optional: a *linear* map from a contracted trace to the trainables' gradient.

    Parameters
    ----------
    dtrace : pytree
        A trace contracted with the learning signal (batch-summed), trace-shaped.
    w : dict
        Trainables (and frozen operands) by name.
    **params
        The equation's static parameters.

    Returns
    -------
    dict
        Gradient by trainable name. Without this rule the learner uses ``dtrace``.
    """

    def __call__(self, dtrace: PyTree, w: Mapping[str, jax.Array], /, **params: Any) -> PyTree: ...


class InputEntries(Protocol):
    """Optional: entries of the op's Jacobian in its input, one per output element.

    For an op linear in ``x`` (``dy/dx`` does not depend on ``x``), one sample's
    ``out[j] = dy[j] / dx[input_index[j]]`` (``0`` where ``input_index[j] < 0``), over
    the flattened ``y`` and ``x`` of one sample. ``SnAp1`` reads it for an op whose
    input reads the state it drives: a dense op's ``W[k, k]`` for a square recurrent
    weight (``docs/algorithms.md``, "SnAp-1").

    Parameters
    ----------
    *operands : Array
        The equation's operands, as the implementation receives them (``x`` with
        its batch axis for a batched op; a frozen base weight too).
    input_index : numpy.ndarray
        ``int`` array with one entry per element of one sample's ``y`` (static).
    **params
        The equation's static parameters.

    Returns
    -------
    Array
        Flat, one entry per element of one sample's ``y``.
    """

    def __call__(self, *operands: jax.Array, input_index: Any, **params: Any) -> jax.Array: ...


class XToInputTrace(Protocol):
    """Optional: the op's input as pp_prop's input-side trace accumulates it.

    pp_prop's ``epsx^t = alpha_x epsx^{t-1} + x^t`` needs an input in a linear space
    in which ``xy_to_dw(epsx, g)`` is the factorised gradient. For most ops that is
    ``x`` itself (the default); an embedding's integer ids become one-hot rows
    (``docs/algorithms.md``, "Embedding").

    Parameters
    ----------
    x : Array
        The op's input, with any leading axes (the batch, a per-sample axis): the
        rule must treat them independently.
    w : dict
        Trainables (and frozen operands) by name, possibly abstract
        (``jax.ShapeDtypeStruct``) when pp_prop only needs the result's shape.
    **params
        The equation's static parameters.

    Returns
    -------
    Array
        Floating array with ``x``'s leading axes; ``xy_to_dw`` accepts it as ``x``.
    """

    def __call__(self, x: jax.Array, w: Mapping[str, Any], /, **params: Any) -> jax.Array: ...


#: The rule slots, in installation order; the single place that lists them.
RULE_SLOTS = (
    "yw_to_w",
    "xy_to_dw",
    "init_drtrl",
    "init_pp",
    "xy_to_trace",
    "trace_to_dw",
    "input_entries",
    "x_to_input_trace",
)
#: The slots every op needs (the seed contract); the others are optional.
SEED_RULE_SLOTS = RULE_SLOTS[:4]


def takes_params(fn: Callable) -> bool:
    """Whether a rule accepts keyword arguments (then ``init_*`` rules get the params).

    Examples
    --------
    >>> from braintrace.contract import takes_params
    >>> takes_params(lambda x, y, w, s: 0), takes_params(lambda x, y, w, s, **p: 0)
    (False, True)
    """
    try:
        kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return False
    return inspect.Parameter.VAR_KEYWORD in kinds


def check_rule(owner: str, slot: str, fn: Any) -> Callable:
    """``fn`` if it may fill ``slot``, else an error that starts with ``owner``."""
    if slot not in RULE_SLOTS:
        raise KeyError(f"unknown rule slot {slot!r}; expected one of {sorted(RULE_SLOTS)}")
    if not callable(fn):
        raise TypeError(f"{owner}: the {slot!r} rule must be callable, got {type(fn).__name__}.")
    return fn


@dataclasses.dataclass(frozen=True)
class OpContract:
    """Everything the compiler and learner need to know about one ETP primitive.

    Parameters
    ----------
    batched : bool
        ``x`` and ``y`` carry a leading batch axis whose rows are independent.
    gradient_enabled : bool
        Identity-like op the compiler differentiates through on a ``y -> h`` walk.
    trainable_invars_fn : InvarsFn, optional
        Trainable operands by name; ``None`` means ``{'weight': 1}``.
    frozen_invars_fn : InvarsFn, optional
        Non-trainable operands the rules need (a mask); ``None`` means none.
    x_invar_index : int or None
        Operand index of the input ``x`` (``None``: the op has no input).
    y_outvar_index : int
        Result index of ``y`` (non-zero only with ``multiple_results``).
    multiple_results : bool
        The implementation returns a tuple of arrays.
    batched_counterpart : ETPPrimitive, optional
        For an unbatched op, the batched primitive its ``vmap`` over ``x`` binds.
    counterpart_is_derived : bool
        ``batched_counterpart`` was derived by ``register_primitive`` for this op
        (so it is forgotten when this op is replaced).
    yw_to_w, xy_to_dw, init_drtrl, init_pp, xy_to_trace, trace_to_dw : callable, optional
        The rules (see the Protocols of :mod:`braintrace.contract`); ``None`` until
        installed.
    input_entries : callable, optional
        The optional rule ``SnAp1`` reads (:class:`InputEntries`).
    x_to_input_trace : callable, optional
        The optional rule pp_prop reads for its input trace (:class:`XToInputTrace`).

    Examples
    --------
    >>> from braintrace.contract import OpContract
    >>> c = OpContract(batched=True)
    >>> c.trainable_invars({})
    {'weight': 1}
    >>> c2 = c.with_rules(yw_to_w=lambda v, t, **p: t)
    >>> c.rule('yw_to_w') is None, callable(c2.rule('yw_to_w'))
    (True, True)
    """

    batched: bool = False
    gradient_enabled: bool = False
    trainable_invars_fn: InvarsFn | None = None
    frozen_invars_fn: InvarsFn | None = None
    x_invar_index: int | None = 0
    y_outvar_index: int = 0
    multiple_results: bool = False
    batched_counterpart: Any | None = None
    counterpart_is_derived: bool = False
    yw_to_w: YwToW | None = None
    xy_to_dw: XyToDw | None = None
    init_drtrl: InitDrtrl | None = None
    init_pp: InitPp | None = None
    xy_to_trace: XyToTrace | None = None
    trace_to_dw: TraceToDw | None = None
    input_entries: InputEntries | None = None
    x_to_input_trace: XToInputTrace | None = None

    def trainable_invars(self, params: Mapping[str, Any]) -> dict[str, int]:
        """Trainable operands of one equation, ``{name: operand_index}``."""
        if self.trainable_invars_fn is None:
            return {"weight": 1}
        return dict(self.trainable_invars_fn(params))

    def frozen_invars(self, params: Mapping[str, Any]) -> dict[str, int]:
        """Frozen operands of one equation, ``{name: operand_index}`` (``{}`` by default)."""
        return {} if self.frozen_invars_fn is None else dict(self.frozen_invars_fn(params))

    def rule(self, slot: str) -> Callable | None:
        """The rule installed in ``slot``, or ``None``."""
        if slot not in RULE_SLOTS:
            raise KeyError(f"unknown rule slot {slot!r}; expected one of {sorted(RULE_SLOTS)}")
        return getattr(self, slot)

    def with_rules(self, *, owner: str = "OpContract.with_rules", **rules: Callable) -> OpContract:
        """A copy with ``rules`` (``slot=fn``) installed; ``self`` is unchanged.

        Every rule is checked before any is installed, so a bad one installs none;
        errors start with ``owner`` (the primitive's description).
        """
        for slot, fn in rules.items():
            check_rule(owner, slot, fn)
        return dataclasses.replace(self, **rules)
