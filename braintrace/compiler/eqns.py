"""Binding jaxpr equations one by one (the program, loops re-traced by the compiler)."""

from __future__ import annotations

from jax.extend import core as jcore

__all__ = ["bind", "eval_eqns"]


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
