"""What linen's and NNX's convolutions do around ``lax.conv_general_dilated``, shared.

Both stock layers fold the batch axes, pad for ``'CIRCULAR'``, ``'REFLECT'`` and
``'CAUSAL'`` with ``jnp.pad`` before a ``'VALID'`` convolution, and add the bias after
it. The ETP twins do the same steps around :func:`braintrace.ops.conv`, so their
outputs are the stock layers' bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from braintrace import ops

Array = jax.Array

_PAD_MODES = {"CIRCULAR": "wrap", "REFLECT": "reflect"}


def spatial(value: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
    """Flax's broadcast of a stride or dilation (``None`` means 1) to ``n`` axes."""
    value = 1 if value is None else value
    return (value,) * n if isinstance(value, int) else tuple(value)


def check_options(owner: str, *, input_dilation: tuple, mask: Any, custom: str | None) -> None:
    """Refuse the stock options the ETP conv op cannot honour, each with its fix."""
    if any(d != 1 for d in input_dilation):
        raise ValueError(
            f"{owner}: input_dilation={input_dilation} (a transposed convolution) is not "
            "supported by the ETP conv op; leave input_dilation=1, or keep the stock layer "
            "(its kernel then gets a one-step gradient, not a trace)."
        )
    if mask is not None:
        raise ValueError(
            f"{owner}: a kernel mask is not supported by the ETP conv op (the masked kernel "
            "would not be the raw parameter the trace trains); leave mask=None, or keep the "
            "stock layer."
        )
    if custom is not None:
        raise ValueError(
            f"{owner}: {custom} cannot be honoured by the ETP conv op (it computes "
            "lax.conv_general_dilated itself, and its trace rules depend on it); leave it at "
            "its default, or keep the stock layer."
        )


def fold_batch(owner: str, inputs: Array, n: int) -> tuple[Array, tuple | None]:
    """``(*batch, *spatial, C)`` to one batch axis, and the batch shape to restore (or None)."""
    inputs = jnp.asarray(inputs)
    if inputs.ndim < n + 1:
        raise ValueError(
            f"{owner}: inputs must be (*batch, *spatial, features) with {n} spatial axes (the "
            f"kernel size's), got shape {tuple(inputs.shape)}."
        )
    batch = inputs.ndim - (n + 1)
    if batch == 1:
        return inputs, None
    return inputs.reshape((-1,) + inputs.shape[batch:]), inputs.shape[:batch]


def pad_inputs(owner: str, inputs: Array, padding: Any, window: tuple, dilation: tuple):
    """``(inputs, lax padding)``: Flax's ``jnp.pad`` for the padding modes lax lacks."""
    try:
        lax_padding = canonicalize_padding(padding, len(window))
    except ValueError as err:
        raise ValueError(f"{owner}: {err}") from None
    if not isinstance(lax_padding, str):
        return inputs, tuple(tuple(pair) for pair in lax_padding)
    if lax_padding in _PAD_MODES:
        dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        return jnp.pad(inputs, pads, mode=_PAD_MODES[lax_padding]), "VALID"
    if lax_padding == "CAUSAL":
        if len(window) != 1:
            raise ValueError(f"{owner}: padding='CAUSAL' is only defined for 1-D convolutions.")
        pads = [(0, 0), (dilation[0] * (window[0] - 1), 0), (0, 0)]
        return jnp.pad(inputs, pads), "VALID"
    return inputs, lax_padding


def conv_call(owner: str, x: Array, kernel: Array, bias: Array | None, dtype: Any, **conv) -> Array:
    """:func:`braintrace.ops.conv` on a folded, padded ``x``; the op's errors name ``owner``."""
    x = jnp.asarray(x, dtype)  # the input is not a parameter: cast it here
    try:
        return ops.conv(x, kernel, bias, dtype=dtype, **conv)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{owner}: {err}") from None
