"""Elementwise ETP op: ``y = fn(weight)`` for per-neuron parameters.

No input ``x`` (``x_invar_index=None``) and identity-like (``gradient_enabled``):
a membrane time constant, a gate bias, a threshold. ``fn`` must act elementwise
(each output entry a function of the same weight entry), so the trace is
``weight``'s shape times ``S``; :func:`elemwise` refuses a ``fn`` that changes the
shape or contains a position-mixing primitive (a reduction, ``cumsum``, a slice).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..primitive import register_primitive
from . import _checks
from .dense import init_output_trace

__all__ = ["elemwise", "etp_elemwise"]

_OP = "braintrace.ops.elemwise"


def _identity(w):
    return w


def _elemwise_impl(weight, *, fn):
    return fn(weight)


def elemwise_yw_to_w(output_vector, trace, **_):
    """Scale the trace position by position."""
    return {"weight": trace["weight"] * output_vector}


def elemwise_xy_to_dw(x, y_cotangent, w, *, fn):
    """VJP of ``fn`` at ``w['weight']`` with cotangent ``y_cotangent`` (``x`` is unused)."""
    del x
    _, vjp = jax.vjp(fn, w["weight"])
    return {"weight": vjp(y_cotangent.astype(w["weight"].dtype))[0]}


def _init_elemwise_drtrl(x_var, y_var, weight_var, num_states):
    var = weight_var["weight"]
    return {"weight": jnp.zeros(tuple(var.shape) + (num_states,), var.dtype)}


etp_elemwise = register_primitive(
    "etp_elemwise",
    _elemwise_impl,
    gradient_enabled=True,
    trainable_invars_fn=lambda params: {"weight": 0},
    x_invar_index=None,
)
etp_elemwise.register_etp_rules(
    yw_to_w=elemwise_yw_to_w,
    xy_to_dw=elemwise_xy_to_dw,
    init_drtrl=_init_elemwise_drtrl,
    init_pp=init_output_trace,
)


@_checks.checked_signature(_OP)
def elemwise(weight: jax.Array, fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """A trainable per-neuron parameter passed through an elementwise map.

    Parameters
    ----------
    weight : Array
        The trainable parameter (any shape, floating dtype).
    fn : callable, optional
        Elementwise map applied to ``weight`` (identity by default), e.g.
        ``jax.nn.softplus`` to keep a time constant positive. Use a function
        defined once (not a new lambda per call) so jit caches stay warm. A map
        that mixes positions (``jnp.cumsum``, ``jax.nn.softmax``, ``jnp.flip``)
        raises ``ValueError``: apply it to the op's output instead.

    Returns
    -------
    Array
        ``fn(weight)``, same shape as ``weight``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace import ops
    >>> ops.elemwise(jnp.zeros(3), jax.nn.sigmoid).tolist()
    [0.5, 0.5, 0.5]
    """
    weight = _checks.as_array(_OP, "weight", weight)
    if fn is None:
        fn = _identity
    if not callable(fn):
        raise TypeError(f"{_OP}: fn must be callable or None, got {type(fn).__name__}.")
    _checks.check_elementwise(_OP, fn, weight)
    return etp_elemwise.bind(weight, fn=fn)
