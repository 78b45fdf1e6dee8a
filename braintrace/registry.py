"""The set of known ETP primitives, and read-only views of their contracts.

The registry holds one thing: the registered primitives by name. Everything else
about an op (its metadata and trace rules) lives in the primitive's frozen
:class:`~braintrace.contract.OpContract`; the rule slots and their arguments are
documented there. Membership is how the compiler recognises an ETP op in a jaxpr
(the primitive object must be the registered one; nothing is matched by name
alone).

The module-level tables of earlier versions (:data:`ETP_PRIMITIVES`,
:data:`ETP_RULES_YW_TO_W`, ..., :data:`RULE_TABLES`) are *views* derived from the
registered primitives' contracts on every access: ``p in ETP_PRIMITIVES``,
``ETP_RULES_XY_TO_DW[p]``, ``set(BATCHED_PRIMITIVES)`` and iteration behave as
before. They are read-only: writing through one raises a ``TypeError`` that
says what to call instead (``register_primitive`` for metadata,
``prim.register_<slot>(fn)`` for rules), so a contract has a single source of
truth and forgetting a primitive needs no hand-kept clean-up.

Examples
--------
>>> from braintrace import ops, registry
>>> registry.is_etp_primitive(ops.etp_mv), ops.etp_mv in registry.ETP_RULES_YW_TO_W
(True, True)
>>> registry.get_batched_counterpart(ops.etp_mv) is ops.etp_mm
True
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

from .contract import RULE_SLOTS, OpContract

__all__ = [
    "BY_NAME",
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
    "ETP_RULES_INPUT_ENTRIES",
    "ETP_RULES_X_TO_INPUT_TRACE",
    "BATCHED_COUNTERPARTS",
    "RULE_TABLES",
    "is_etp_primitive",
    "is_batched",
    "is_gradient_enabled",
    "get_contract",
    "get_trainable_invars",
    "get_frozen_invars",
    "get_x_invar_index",
    "get_y_outvar_index",
    "get_rule",
    "has_rule",
    "get_batched_counterpart",
    "get_primitive",
    "claim",
    "forget",
]

# name -> primitive: the registry's only state.
_BY_NAME: dict[str, Any] = {}
#: Read-only ``{name: primitive}`` of every registered ETP primitive.
BY_NAME: Mapping[str, Any] = types.MappingProxyType(_BY_NAME)

_METADATA_ADVICE = (
    "metadata is fixed by braintrace.register_primitive(...); register the op again "
    "with replace=True to change it"
)


def _registered_contract(prim: Any) -> OpContract | None:
    """``prim``'s contract if ``prim`` is the primitive registered under its name."""
    name = getattr(prim, "name", None)
    if not isinstance(name, str) or _BY_NAME.get(name) is not prim:
        return None
    return prim.contract


def _live_counterpart(contract: OpContract) -> Any | None:
    """The contract's batched counterpart, if it is still registered."""
    twin = contract.batched_counterpart
    return twin if twin is not None and _registered_contract(twin) is not None else None


# -- read-only views ----------------------------------------------------------------


def _always(contract: OpContract) -> bool:
    return True


class _View:
    """A live, read-only view: the registered primitives whose contract passes ``present``.

    Each mutator raises a ``TypeError`` that says what to call instead.
    """

    def __init__(
        self,
        label: str,
        present: Callable[[OpContract], bool] = _always,
        advice: str = _METADATA_ADVICE,
    ):
        self._label, self._present, self._advice = label, present, advice

    def _contract_of(self, prim: Any) -> OpContract | None:
        contract = _registered_contract(prim)
        return contract if contract is not None and self._present(contract) else None

    def __iter__(self) -> Iterator[Any]:
        return (p for p in list(_BY_NAME.values()) if self._present(p.contract))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"<read-only view registry.{self._label} of {len(self)} primitives>"

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"braintrace.registry.{self._label} is a read-only view of the registered "
            f"primitives' contracts; {self._advice}."
        )

    __setitem__ = __delitem__ = add = discard = remove = pop = clear = update = _refuse
    setdefault = popitem = _refuse


class _PrimitiveSet(_View, Set):
    """``{prim}`` over the registered primitives whose contract passes ``present``."""

    def __contains__(self, prim: object) -> bool:
        return self._contract_of(prim) is not None


class _ContractMapping(_View, Mapping):
    """``{prim: value(contract)}`` over the registered primitives passing ``present``."""

    def __init__(
        self,
        label: str,
        value: Callable[[OpContract], Any],
        present: Callable[[OpContract], bool] = _always,
        advice: str = _METADATA_ADVICE,
    ):
        super().__init__(label, present, advice)
        self._value = value

    def __getitem__(self, prim: Any) -> Any:
        contract = self._contract_of(prim)
        if contract is None:
            raise KeyError(prim)
        return self._value(contract)


def _rule_view(slot: str) -> _ContractMapping:
    advice = f"install a rule with prim.register_{slot}(fn) or prim.register_etp_rules({slot}=fn)"
    return _ContractMapping(
        f"ETP_RULES_{slot.upper()}",
        lambda c: c.rule(slot),
        lambda c: c.rule(slot) is not None,
        advice,
    )


ETP_PRIMITIVES: Set = _PrimitiveSet("ETP_PRIMITIVES")
BATCHED_PRIMITIVES: Set = _PrimitiveSet("BATCHED_PRIMITIVES", lambda c: c.batched)
GRADIENT_ENABLED_PRIMITIVES: Set = _PrimitiveSet(
    "GRADIENT_ENABLED_PRIMITIVES", lambda c: c.gradient_enabled
)

ETP_TRAINABLE_INVARS_FNS: Mapping = _ContractMapping(
    "ETP_TRAINABLE_INVARS_FNS", lambda c: c.trainable_invars_fn
)
#: Non-trainable operands the rules need (a mask), ``params -> {name: invar_index}``.
ETP_FROZEN_INVARS_FNS: Mapping = _ContractMapping(
    "ETP_FROZEN_INVARS_FNS", lambda c: c.frozen_invars_fn
)
ETP_X_INVAR_INDICES: Mapping = _ContractMapping("ETP_X_INVAR_INDICES", lambda c: c.x_invar_index)
ETP_Y_OUTVAR_INDICES: Mapping = _ContractMapping("ETP_Y_OUTVAR_INDICES", lambda c: c.y_outvar_index)

#: slot name -> read-only ``{prim: rule}`` view; one per entry of ``contract.RULE_SLOTS``.
RULE_TABLES: Mapping[str, Mapping] = types.MappingProxyType(
    {slot: _rule_view(slot) for slot in RULE_SLOTS}
)
ETP_RULES_YW_TO_W: Mapping = RULE_TABLES["yw_to_w"]
ETP_RULES_XY_TO_DW: Mapping = RULE_TABLES["xy_to_dw"]
ETP_RULES_INIT_DRTRL: Mapping = RULE_TABLES["init_drtrl"]
ETP_RULES_INIT_PP: Mapping = RULE_TABLES["init_pp"]
ETP_RULES_XY_TO_TRACE: Mapping = RULE_TABLES["xy_to_trace"]
ETP_RULES_TRACE_TO_DW: Mapping = RULE_TABLES["trace_to_dw"]
ETP_RULES_INPUT_ENTRIES: Mapping = RULE_TABLES["input_entries"]
ETP_RULES_X_TO_INPUT_TRACE: Mapping = RULE_TABLES["x_to_input_trace"]

#: unbatched primitive -> the (still registered) batched primitive its ``vmap`` rebinds.
BATCHED_COUNTERPARTS: Mapping = _ContractMapping(
    "BATCHED_COUNTERPARTS", _live_counterpart, lambda c: _live_counterpart(c) is not None
)


# -- accessors -----------------------------------------------------------------------


def is_etp_primitive(prim: Any) -> bool:
    """Whether ``prim`` was created by :func:`braintrace.register_primitive`."""
    return _registered_contract(prim) is not None


def is_batched(prim: Any) -> bool:
    """Whether ``prim`` takes a leading batch axis on ``x`` and ``y``."""
    return prim in BATCHED_PRIMITIVES


def is_gradient_enabled(prim: Any) -> bool:
    """Whether the compiler differentiates through ``prim`` on a ``y -> h`` walk."""
    return prim in GRADIENT_ENABLED_PRIMITIVES


def get_contract(prim: Any) -> OpContract:
    """The :class:`~braintrace.contract.OpContract` of a registered ETP primitive."""
    contract = _registered_contract(prim)
    if contract is None:
        raise KeyError(
            f"{prim!r} is not a registered ETP primitive; create it with "
            "braintrace.register_primitive(...)."
        )
    return contract


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
    return get_contract(prim).trainable_invars(params)


def get_frozen_invars(prim: Any, params: Mapping[str, Any]) -> dict[str, int]:
    """Map of frozen-operand name to invar index (``{}`` unless registered).

    Frozen operands are non-trainable inputs the rules must see (a mask, a fixed
    scale): the learner passes them inside ``w`` next to the trainables, and never
    differentiates with respect to them.
    """
    return get_contract(prim).frozen_invars(params)


def get_x_invar_index(prim: Any) -> int | None:
    """Index of the op's input ``x`` among its operands (``None``: no input)."""
    return get_contract(prim).x_invar_index


def get_y_outvar_index(prim: Any) -> int:
    """Index of the op's output ``y`` among its results."""
    return get_contract(prim).y_outvar_index


def _check_slot(slot: str) -> None:
    if slot not in RULE_TABLES:
        raise KeyError(f"unknown rule slot {slot!r}; expected one of {sorted(RULE_TABLES)}")


def has_rule(prim: Any, slot: str) -> bool:
    """Whether a rule is installed in ``slot`` for ``prim`` (``False`` if unregistered)."""
    _check_slot(slot)
    return prim in RULE_TABLES[slot]


def get_rule(prim: Any, slot: str) -> Callable:
    """The rule installed in ``slot`` for ``prim``, with a clear error if absent."""
    contract = get_contract(prim)
    _check_slot(slot)
    fn = contract.rule(slot)
    if fn is None:
        raise NotImplementedError(
            f"ETP primitive {prim.name!r} has no {slot!r} rule; install one with "
            f"{prim.name}.register_{slot}(fn) or register_etp_rules({slot}=fn)."
        )
    return fn


def get_batched_counterpart(prim: Any) -> Any | None:
    """The batched primitive that ``vmap`` of unbatched ``prim`` rebinds, if any."""
    return BATCHED_COUNTERPARTS.get(prim)


def get_primitive(name: str) -> Any:
    """The registered ETP primitive called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no ETP primitive is registered under the name {name!r}") from None


# -- membership (used by register_primitive) ----------------------------------------


def claim(prim: Any, *, replace: bool = False) -> None:
    """Register ``prim`` under its name; refuse a clash unless ``replace``.

    With ``replace``, the primitive it displaces is forgotten (with its derived
    batched twin, see :func:`forget`).
    """
    old = _BY_NAME.get(prim.name)
    if old is not None and old is not prim:
        if not replace:
            raise ValueError(
                f"an ETP primitive named {prim.name!r} is already registered; choose another "
                "name or pass replace=True to register_primitive to replace it."
            )
        forget(old)
    _BY_NAME[prim.name] = prim


def forget(prim: Any) -> None:
    """Unregister ``prim`` and the batched twin ``register_primitive`` derived for it.

    Every view stops listing them at once; a primitive registered with an explicit
    ``batched_counterpart`` sees :func:`get_batched_counterpart` return ``None``
    once that counterpart is forgotten (its ``vmap`` then dissolves with a warning).
    """
    contract = _registered_contract(prim)
    if contract is None:
        return
    del _BY_NAME[prim.name]
    if contract.counterpart_is_derived:
        forget(contract.batched_counterpart)
