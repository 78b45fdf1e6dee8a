"""Global registries of ETP primitives and their eligibility-trace rules.

Membership in :data:`ETP_PRIMITIVES` is how the compiler recognises an ETP op in a
jaxpr; nothing is matched by name. Every table is keyed by the primitive object.

Rule slots
----------
The four slots of the seed contract (DESIGN.md section 4):

``ETP_RULES_YW_TO_W``
    ``(hidden_dim, trace, **params) -> trace``: scale a D-RTRL trace by an
    output-shaped vector along the output axis.
``ETP_RULES_XY_TO_DW``
    ``(x, hidden_dim, w, **params) -> dw``: the op's VJP with respect to its
    trainable inputs, at input ``x`` and cotangent ``hidden_dim``.
``ETP_RULES_INIT_DRTRL``
    ``(x_var, y_var, weight_var, num_hidden_state) -> trace``: zeros of the
    D-RTRL trace (each trace leaf has the trainable's shape plus a trailing
    ``num_hidden_state`` axis, and a leading batch axis for batched ops).
``ETP_RULES_INIT_PP``
    ``(x_var, y_var, weight_var, num_hidden_state) -> zeros``: pp_prop's
    output-side trace, ``y`` shape plus a trailing ``num_hidden_state`` axis.

Two optional slots let an op keep its D-RTRL trace in another space than its
trainables (LoRA keeps it on the effective weight ``W0 + s A B``, which is smaller
than a trace on ``A`` and ``B`` and still exact because the chain is linear):

``ETP_RULES_XY_TO_TRACE``
    ``(x, hidden_dim, w, **params) -> trace``: the instantaneous D-RTRL term in
    trace space. Defaults to ``xy_to_dw``.
``ETP_RULES_TRACE_TO_DW``
    ``(dtrace, w, **params) -> dw``: a *linear* map from a contracted trace to the
    gradient of the trainables. Defaults to the identity.

A batched primitive's gradient rules (``xy_to_dw``, ``xy_to_trace``) sum over the
batch axis, as its VJP does; the learner applies them to one sample at a time
(:mod:`braintrace.rules`). ``w`` holds the trainables by name, plus any frozen
operands named by ``ETP_FROZEN_INVARS_FNS`` (a mask the rules must apply).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "ETP_PRIMITIVES",
    "BATCHED_PRIMITIVES",
    "GRADIENT_ENABLED_PRIMITIVES",
    "ETP_TRAINABLE_INVARS_FNS",
    "ETP_FROZEN_INVARS_FNS",
    "ETP_X_INVAR_INDICES",
    "ETP_Y_OUTVAR_INDICES",
    "ETP_RULES_YW_TO_W",
    "ETP_RULES_XY_TO_DW",
    "ETP_RULES_INIT_DRTRL",
    "ETP_RULES_INIT_PP",
    "ETP_RULES_XY_TO_TRACE",
    "ETP_RULES_TRACE_TO_DW",
    "BATCHED_COUNTERPARTS",
    "RULE_TABLES",
    "is_etp_primitive",
    "is_batched",
    "is_gradient_enabled",
    "get_trainable_invars",
    "get_frozen_invars",
    "get_x_invar_index",
    "get_y_outvar_index",
    "get_rule",
    "has_rule",
    "get_batched_counterpart",
    "get_primitive",
]

ETP_PRIMITIVES: set = set()
BATCHED_PRIMITIVES: set = set()
GRADIENT_ENABLED_PRIMITIVES: set = set()

ETP_TRAINABLE_INVARS_FNS: dict = {}
#: Non-trainable operands the rules need (a mask), ``params -> {name: invar_index}``.
ETP_FROZEN_INVARS_FNS: dict = {}
ETP_X_INVAR_INDICES: dict = {}
ETP_Y_OUTVAR_INDICES: dict = {}

ETP_RULES_YW_TO_W: dict = {}
ETP_RULES_XY_TO_DW: dict = {}
ETP_RULES_INIT_DRTRL: dict = {}
ETP_RULES_INIT_PP: dict = {}
ETP_RULES_XY_TO_TRACE: dict = {}
ETP_RULES_TRACE_TO_DW: dict = {}

#: unbatched primitive -> the batched primitive its ``vmap`` rebinds.
BATCHED_COUNTERPARTS: dict = {}

#: slot name -> table; the single place that lists the rule slots.
RULE_TABLES: dict[str, dict] = {
    "yw_to_w": ETP_RULES_YW_TO_W,
    "xy_to_dw": ETP_RULES_XY_TO_DW,
    "init_drtrl": ETP_RULES_INIT_DRTRL,
    "init_pp": ETP_RULES_INIT_PP,
    "xy_to_trace": ETP_RULES_XY_TO_TRACE,
    "trace_to_dw": ETP_RULES_TRACE_TO_DW,
}

# name -> primitive, to refuse accidental re-registration of a name.
_BY_NAME: dict[str, Any] = {}

_METADATA_TABLES = (
    ETP_TRAINABLE_INVARS_FNS,
    ETP_FROZEN_INVARS_FNS,
    ETP_X_INVAR_INDICES,
    ETP_Y_OUTVAR_INDICES,
    BATCHED_COUNTERPARTS,
)


def is_etp_primitive(prim: Any) -> bool:
    """Whether ``prim`` was created by :func:`braintrace.register_primitive`."""
    return prim in ETP_PRIMITIVES


def is_batched(prim: Any) -> bool:
    """Whether ``prim`` takes a leading batch axis on ``x`` and ``y``."""
    return prim in BATCHED_PRIMITIVES


def is_gradient_enabled(prim: Any) -> bool:
    """Whether the compiler differentiates through ``prim`` on a ``y -> h`` walk."""
    return prim in GRADIENT_ENABLED_PRIMITIVES


def _check_known(prim: Any) -> None:
    if prim not in ETP_PRIMITIVES:
        raise KeyError(
            f"{prim!r} is not a registered ETP primitive; create it with "
            "braintrace.register_primitive(...)."
        )


def get_trainable_invars(prim: Any, params: Mapping[str, Any]) -> dict[str, int]:
    """Map of trainable-input name to invar index for one equation of ``prim``.

    Parameters
    ----------
    prim : ETPPrimitive
        A registered ETP primitive.
    params : mapping
        The equation's (or ``bind``'s) keyword parameters.

    Returns
    -------
    dict
        ``{name: invar_index}``; ``{'weight': 1}`` when the primitive was
        registered without ``trainable_invars_fn``.
    """
    _check_known(prim)
    fn = ETP_TRAINABLE_INVARS_FNS.get(prim)
    if fn is None:
        return {"weight": 1}
    return dict(fn(params))


def get_frozen_invars(prim: Any, params: Mapping[str, Any]) -> dict[str, int]:
    """Map of frozen-operand name to invar index (``{}`` unless registered).

    Frozen operands are non-trainable inputs the rules must see (a mask, a fixed
    scale): the learner passes them inside ``w`` next to the trainables, and never
    differentiates with respect to them.
    """
    _check_known(prim)
    fn = ETP_FROZEN_INVARS_FNS.get(prim)
    return {} if fn is None else dict(fn(params))


def get_x_invar_index(prim: Any) -> int | None:
    """Index of the op's input ``x`` among its operands (``None``: no input)."""
    _check_known(prim)
    return ETP_X_INVAR_INDICES[prim]


def get_y_outvar_index(prim: Any) -> int:
    """Index of the op's output ``y`` among its results."""
    _check_known(prim)
    return ETP_Y_OUTVAR_INDICES[prim]


def has_rule(prim: Any, slot: str) -> bool:
    """Whether a rule is installed in ``slot`` for ``prim``."""
    return prim in RULE_TABLES[slot]


def get_rule(prim: Any, slot: str) -> Callable:
    """The rule installed in ``slot`` for ``prim``, with a clear error if absent."""
    _check_known(prim)
    if slot not in RULE_TABLES:
        raise KeyError(f"unknown rule slot {slot!r}; expected one of {sorted(RULE_TABLES)}")
    table = RULE_TABLES[slot]
    if prim not in table:
        raise NotImplementedError(
            f"ETP primitive {prim.name!r} has no {slot!r} rule; install one with "
            f"{prim.name}.register_{slot}(fn) or register_etp_rules({slot}=fn)."
        )
    return table[prim]


def get_batched_counterpart(prim: Any) -> Any | None:
    """The batched primitive that ``vmap`` of unbatched ``prim`` rebinds, if any."""
    return BATCHED_COUNTERPARTS.get(prim)


def get_primitive(name: str) -> Any:
    """The registered ETP primitive called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no ETP primitive is registered under the name {name!r}") from None


def _claim_name(name: str, prim: Any, replace: bool) -> None:
    """Record ``prim`` under ``name``; refuse a clash unless ``replace``."""
    old = _BY_NAME.get(name)
    if old is not None:
        if not replace:
            raise ValueError(
                f"an ETP primitive named {name!r} is already registered; choose another "
                "name or pass replace=True to register_primitive to replace it."
            )
        _forget(old)
    _BY_NAME[name] = prim


def _forget(prim: Any) -> None:
    for table in (ETP_PRIMITIVES, BATCHED_PRIMITIVES, GRADIENT_ENABLED_PRIMITIVES):
        table.discard(prim)
    for table in (*_METADATA_TABLES, *RULE_TABLES.values()):
        table.pop(prim, None)
    for unbatched, batched in list(BATCHED_COUNTERPARTS.items()):
        if batched is prim:
            del BATCHED_COUNTERPARTS[unbatched]
    _BY_NAME.pop(prim.name, None)
