"""The batched twin of an unbatched ETP op: its implementation and rules, by ``vmap``.

``jax.vmap`` over an unbatched op's input must keep the op visible to the compiler,
so :func:`braintrace.register_primitive` derives a batched primitive from it (named
``<name>_batched``). Its implementation maps the unbatched one over ``x``; its rules
map the unbatched rules over the batch axis and sum the gradient rules over it, as
a batched op's VJP does. The rules look the unbatched op's rules up when called, so
rules installed on the unbatched op after registration are picked up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import registry
from .contract import takes_params

__all__ = ["twin_impl", "twin_rules"]

_tree_map = jax.tree_util.tree_map


def twin_impl(unbatched: Any) -> Callable:
    """``impl_fn`` of the twin: the unbatched implementation mapped over ``x``."""
    x_index = unbatched.contract.x_invar_index

    def impl(*args, **params):
        in_axes = [None] * len(args)
        in_axes[x_index] = 0
        per_row = functools.partial(unbatched.impl_fn, **params)
        return jax.vmap(per_row, in_axes=tuple(in_axes))(*args)

    return impl


def _sum_batch(tree):
    return _tree_map(lambda a: a.sum(0), tree)


def _drop_batch(var: Any) -> jax.ShapeDtypeStruct | None:
    if var is None:
        return None
    return jax.ShapeDtypeStruct(tuple(var.shape[1:]), var.dtype)


def twin_rules(unbatched: Any) -> dict[str, Callable]:
    """The rules of the twin of ``unbatched``, by slot."""
    rule = functools.partial(registry.get_rule, unbatched)

    def yw_to_w(output_vector, trace, **params):
        return jax.vmap(lambda v, t: rule("yw_to_w")(v, t, **params))(output_vector, trace)

    def xy_to_dw(x, y_cotangent, w, **params):
        per_row = jax.vmap(lambda a, c: rule("xy_to_dw")(a, c, w, **params))
        return _sum_batch(per_row(x, y_cotangent))

    def xy_to_trace(x, y_cotangent, w, **params):
        slot = "xy_to_trace" if registry.has_rule(unbatched, "xy_to_trace") else "xy_to_dw"
        per_row = jax.vmap(lambda a, c: rule(slot)(a, c, w, **params))
        return _sum_batch(per_row(x, y_cotangent))

    def trace_to_dw(dtrace, w, **params):
        if not registry.has_rule(unbatched, "trace_to_dw"):
            return dtrace
        return rule("trace_to_dw")(dtrace, w, **params)

    def input_entries(*operands, input_index, **params):
        return rule("input_entries")(*operands, input_index=input_index, **params)

    def x_to_input_trace(x, w, **params):
        if not registry.has_rule(unbatched, "x_to_input_trace"):
            return x
        return rule("x_to_input_trace")(x, w, **params)  # treats leading axes independently

    def init(slot):
        def zeros_with_batch(x_var, y_var, weight_var, num_states, **params):
            fn = rule(slot)
            params = params if takes_params(fn) else {}
            one = fn(_drop_batch(x_var), _drop_batch(y_var), weight_var, num_states, **params)
            size = x_var.shape[0]
            return _tree_map(lambda z: jnp.zeros((size,) + tuple(z.shape), z.dtype), one)

        return zeros_with_batch

    return dict(
        yw_to_w=yw_to_w,
        xy_to_dw=xy_to_dw,
        init_drtrl=init("init_drtrl"),
        init_pp=init("init_pp"),
        xy_to_trace=xy_to_trace,
        trace_to_dw=trace_to_dw,
        input_entries=input_entries,
        x_to_input_trace=x_to_input_trace,
    )
