"""Reroute stock linen layers to ETP ops: ``convert_dense=True`` in one context manager.

Inside :func:`etp_dense_calls` every ``flax.linen.Dense.__call__`` runs
:func:`braintrace_flax.layers.dense_forward` (same params, same result, but through
the ETP dense op), so stock cells such as ``nn.SimpleCell``, ``nn.GRUCell``,
``nn.LSTMCell`` and ``nn.MGUCell`` learn online unchanged.
``nn.OptimizedLSTMCell`` fuses its gate kernels with ``jnp.concatenate`` (no Dense
calls); it is rerouted as a whole to :class:`braintrace_flax.ETPLSTMCell`'s equations,
whose parameter tree is the same. Stock ``nn.Embed`` (``__call__`` and ``attend``),
``nn.Einsum`` and ``nn.DenseGeneral`` run through the embedding and einsum ops
(:mod:`braintrace_flax.embed_einsum`). Stock ``nn.Conv`` runs
:func:`braintrace_flax.conv.conv_forward` (the ETP conv op), so ``nn.ConvLSTMCell``
learns online too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn

from .cells import lstm_forward
from .conv import conv_forward
from .embed_einsum import attend_forward, dense_general_forward, einsum_forward, embed_forward
from .layers import dense_forward

__all__ = ["etp_dense_calls", "dense_interceptor"]


def _is_stock_call(module: nn.Module, method_name: str, base: type) -> bool:
    """``module`` is a ``base`` whose ``__call__`` is ``base``'s own (not overridden)."""
    return _is_stock_method(module, method_name, base, "__call__")


def _is_stock_method(module: nn.Module, method_name: str, base: type, method: str) -> bool:
    """``module`` is a ``base`` calling ``method``, and ``method`` is ``base``'s own."""
    return (
        method_name == method
        and isinstance(module, base)
        and getattr(type(module), method) is getattr(base, method)
    )


#: Stock layers rerouted method by method: (class, method, ETP forward).
_REROUTED = (
    (nn.Embed, "__call__", embed_forward),
    (nn.Embed, "attend", attend_forward),
    (nn.Einsum, "__call__", einsum_forward),
    (nn.DenseGeneral, "__call__", dense_general_forward),
)


def dense_interceptor(next_fun, args: tuple, kwargs: dict, context) -> Any:
    """A ``flax.linen.intercept_methods`` interceptor: stock Dense calls go through ETP ops.

    Subclasses that override ``__call__`` (including :class:`ETPDense`) are left alone.
    """
    module = context.module
    if _is_stock_call(module, context.method_name, nn.Dense):
        return dense_forward(module, *args, **kwargs)
    if _is_stock_call(module, context.method_name, nn.OptimizedLSTMCell):
        return lstm_forward(module, *args, **kwargs)
    if _is_stock_call(module, context.method_name, nn.Conv):
        return conv_forward(module, *args, **kwargs)
    for base, method, forward in _REROUTED:
        if _is_stock_method(module, context.method_name, base, method):
            return forward(module, *args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def etp_dense_calls() -> Iterator[None]:
    """Run stock ``nn.Dense`` layers (and ``nn.OptimizedLSTMCell``) through ETP ops.

    Parameters are created and read exactly as by the stock layers, so ``init``
    inside and outside the context gives the same variables.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import etp_dense_calls
    >>> cell = nn.GRUCell(4)
    >>> h, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
    >>> v = cell.init(jax.random.key(0), h, x)
    >>> with etp_dense_calls():
    ...     jaxpr = jax.make_jaxpr(lambda v: cell.apply(v, h, x))(v)
    >>> sum(e.primitive.name == 'etp_mm' for e in jaxpr.eqns)
    6
    """
    with nn.intercept_methods(dense_interceptor):
        yield
