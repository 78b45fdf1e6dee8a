"""One ETP op as two primitives: unbatched and batched, one implementation, one set of rules."""

from __future__ import annotations

from collections.abc import Callable

from ..primitive import ETPPrimitive, register_primitive

__all__ = ["register_pair", "weight_and_bias"]


def register_pair(
    name: str,
    batched_name: str,
    impl_fn: Callable,
    rules: Callable[[bool], dict],
    *,
    trainable_invars_fn: Callable | None = None,
) -> tuple[ETPPrimitive, ETPPrimitive]:
    """Register an unbatched ETP primitive and its batched counterpart.

    ``rules(batched)`` gives the keyword arguments of
    :meth:`~braintrace.primitive.ETPPrimitive.register_etp_rules` for each (a rule that
    needs to know whether its operands carry a batch axis is bound here).
    Returns ``(unbatched, batched)``.
    """
    options = {} if trainable_invars_fn is None else {"trainable_invars_fn": trainable_invars_fn}
    batched = register_primitive(batched_name, impl_fn, batched=True, **options)
    unbatched = register_primitive(name, impl_fn, batched_counterpart=batched, **options)
    for prim, is_batched in ((unbatched, False), (batched, True)):
        prim.register_etp_rules(**rules(is_batched))
    return unbatched, batched


def weight_and_bias(weight: str) -> Callable:
    """The ``trainable_invars_fn`` of an op ``(x, weight[, bias])``: ``{weight: 1}``, plus
    ``{'bias': 2}`` when the equation's ``has_bias`` parameter is set."""

    def trainables(params) -> dict:
        return {weight: 1, "bias": 2} if params["has_bias"] else {weight: 1}

    return trainables
