"""Jaxpr equations one by one: binding them, and the jaxprs nested in them.

Shared by the program (flattening, evaluation) and the control-flow rewrites.
"""

from __future__ import annotations

from jax.extend import core as jcore

__all__ = ["bind", "eval_eqns", "closed_parts", "sub_jaxprs", "contains_primitive"]


def bind(primitive, params, invals):
    """Bind ``primitive`` as an equation would (older JAX returns subfunctions too)."""
    bind_params = primitive.get_bind_params(params)
    subfuns = []
    if isinstance(bind_params, tuple):
        subfuns, bind_params = bind_params
    return primitive.bind(*subfuns, *invals, **bind_params)


def read(env: dict, atom):
    return atom.val if isinstance(atom, jcore.Literal) else env[atom]


def eval_eqns(eqns, env: dict) -> None:
    """Evaluate ``eqns`` in order, reading and writing ``env`` (jaxpr variable -> value)."""
    for eqn in eqns:
        outs = bind(eqn.primitive, eqn.params, [read(env, a) for a in eqn.invars])
        outs = outs if eqn.primitive.multiple_results else [outs]
        for var, value in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                env[var] = value


def closed_parts(jaxpr) -> tuple:
    """``(Jaxpr, consts)`` of a ``ClosedJaxpr`` or a ``Jaxpr``."""
    if isinstance(jaxpr, jcore.ClosedJaxpr):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def sub_jaxprs(params) -> list:
    """The (closed) jaxprs held in an equation's params, in order."""
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                found.append(item)
    return found


def contains_primitive(jaxpr, predicate) -> bool:
    """Whether ``jaxpr`` (recursively) has an equation whose primitive satisfies ``predicate``."""
    inner, _ = closed_parts(jaxpr)
    return any(
        predicate(eqn.primitive)
        or any(contains_primitive(sub, predicate) for sub in sub_jaxprs(eqn.params))
        for eqn in inner.eqns
    )
