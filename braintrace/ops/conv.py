"""Convolution ETP op: N-d ``lax.conv_general_dilated`` in Flax's channels-last layout.

``y = conv(x, kernel) (+ bias)`` with ``x`` of shape ``(*spatial, C_in)`` (binds
``etp_conv``) or ``(batch, *spatial, C_in)`` (binds ``etp_conv_batched``), ``kernel``
of shape ``(*window, C_in // G, C_out)`` and ``G = feature_group_count``. Trainables
``{'kernel', 'bias'}``. ``layout='channels_first'`` binds the twins ``etp_conv_cf`` /
``etp_conv_cf_batched`` for Equinox's layout (``x (C_in, *spatial)``, kernel ``(C_out,
C_in // G, *window)``, bias ``(C_out, 1, ..., 1)``), so its weight reaches the op
unchanged; the rules work in the channels-last layout and their traces are the same.

Traces (``docs/algorithms.md``, "Convolution"). The kernel and the bias are shared by
every output position while ``D`` acts per output element, so a kernel-shaped D-RTRL
trace (positions summed) is not exact. The D-RTRL trace is kept *unshared*: one
kernel-shaped block per output position, ``(*out_spatial, *window, C_in // G, C_out)``
per state, filled from the input patches by ``xy_to_trace`` and summed over the
positions by ``trace_to_dw`` (linear, so the sum commutes with the time sum). pp_prop
keeps the op's input (the patches of the decayed input are the decayed patches) and an
output-shaped trace, and its gradient is the op's kernel VJP at those two.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks
from ._pair import register_pair, weight_and_bias
from .dense import init_output_trace

__all__ = [
    "conv",
    "etp_conv",
    "etp_conv_batched",
    "etp_conv_cf",
    "etp_conv_cf_batched",
    "PADDINGS",
    "conv_trace_sizes",
]

_OP = "braintrace.ops.conv"
#: The padding names the op accepts (else explicit ``(low, high)`` pairs per spatial axis).
PADDINGS = ("SAME", "VALID", "SAME_LOWER")


def _dimension_numbers(n: int, layout: str = "channels_last") -> lax.ConvDimensionNumbers:
    """The op's layouts for ``n`` spatial axes (``x``/``y`` with a batch axis).

    ``'channels_last'`` (Flax): ``x (B, *spatial, C)``, kernel ``(*window, in, out)``;
    ``'channels_first'`` (Equinox): ``x (B, C, *spatial)``, kernel ``(out, in, *window)``.
    """
    if layout == "channels_first":
        every = tuple(range(n + 2))
        return lax.ConvDimensionNumbers(lhs_spec=every, rhs_spec=every, out_spec=every)
    spatial = tuple(range(1, n + 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, n + 1) + spatial,
        rhs_spec=(n + 1, n) + tuple(range(n)),
        out_spec=(0, n + 1) + spatial,
    )


def _to_channels_last(array, n: int, layout: str):
    """An ``x``- or ``y``-shaped array (any leading axes) in the channels-last layout."""
    if layout == "channels_last":
        return array
    return jnp.moveaxis(array, array.ndim - n - 1, -1)


def _kernel_last(kernel, layout: str):
    """The kernel as ``(*window, in, out)``."""
    if layout == "channels_last":
        return kernel
    n = kernel.ndim - 2
    return jnp.transpose(kernel, tuple(range(2, n + 2)) + (1, 0))


def _with_batch(x, kernel):
    """``(x with a leading batch axis, whether one was added)``: the op's own batching."""
    unbatched = x.ndim == kernel.ndim - 1
    return (x[None] if unbatched else x), unbatched


def _conv_impl(
    x,
    kernel,
    *bias,
    strides,
    padding,
    rhs_dilation,
    feature_group_count,
    has_bias,
    dtype,
    precision,
    layout,
):
    del has_bias
    x, kernel, *bias = _checks.cast(dtype, x, kernel, *bias)
    lhs, unbatched = _with_batch(x, kernel)
    y = lax.conv_general_dilated(
        lhs,
        kernel,
        strides,
        padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_dimension_numbers(kernel.ndim - 2, layout),
        feature_group_count=feature_group_count,
        precision=precision,
    )
    if bias:
        y = y + bias[0]
    return y[0] if unbatched else y


_trainables = weight_and_bias("kernel")


# -- rules (shared by the batched and unbatched primitives) ---------------------------------
# ``...`` is the batch axis for etp_conv_batched and nothing for etp_conv; the gradient
# rules sum over it, as the op's VJP does. A D-RTRL trace block is kernel-shaped per
# output position: ``(*out_spatial, *window, C_in // G, C_out)``.


def _patches(x, kernel, *, strides, padding, rhs_dilation, feature_group_count, dtype, **_):
    # ``x`` and ``kernel`` channels-last here (see _to_channels_last, _kernel_last).
    """Patches ``(B, *out_spatial, G, C_in // G, *window)`` of ``x`` (batch axis added if none)."""
    if dtype is not None:
        x = x.astype(dtype)
    lhs, _ = _with_batch(x, kernel)
    n = kernel.ndim - 2
    window = kernel.shape[:n]
    flat = lax.conv_general_dilated_patches(
        lhs,
        window,
        strides,
        padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_dimension_numbers(n),
        precision=lax.Precision.HIGHEST,
    )  # features ordered (C_in, *window), channel-major
    groups, c_in = feature_group_count, kernel.shape[n]
    return flat.reshape(flat.shape[:-1] + (groups, c_in) + tuple(window))


def conv_xy_to_trace(x, y_cotangent, w, **params):
    """Instantaneous unshared D-RTRL term: ``patch[p, window, c] * y_cotangent[p, o]``.

    Returns ``{'kernel': (*out_spatial, *window, C_in // G, C_out), 'bias': (*out_spatial,
    C_out)}``, summed over the batch axis of a batched op.
    """
    layout = params["layout"]
    kernel = _kernel_last(w["kernel"], layout)
    n = kernel.ndim - 2
    x, y_cotangent = (_to_channels_last(a, n, layout) for a in (x, y_cotangent))
    patches = _patches(x, kernel, **params)  # (B, *P, G, c, *window)
    groups = params["feature_group_count"]
    cot = y_cotangent if y_cotangent.ndim == n + 2 else y_cotangent[None]
    cot = cot.reshape(cot.shape[:-1] + (groups, kernel.shape[-1] // groups))  # (B, *P, G, o)
    # Move the window axes in front of the channel axis, then pair each group's patch
    # with its own output channels.
    moved = jnp.moveaxis(patches, n + 2, -1)  # (B, *P, G, *window, c)
    block = moved[..., None] * cot[..., *([None] * (n + 1)), :]  # (B, *P, G, *window, c, o)
    block = jnp.moveaxis(block, n + 1, -2).sum(0)  # (*P, *window, c, G, o)
    trace = {"kernel": block.reshape(block.shape[:-2] + (kernel.shape[-1],)).astype(kernel.dtype)}
    if params["has_bias"]:
        trace["bias"] = cot.reshape(cot.shape[:-2] + (-1,)).sum(0).astype(w["bias"].dtype)
    return trace


def conv_yw_to_w(output_vector, trace, *, has_bias, layout, **_):
    """Scale an unshared trace by an output-shaped vector, position by position."""
    kernel = trace["kernel"]
    n_window = kernel.ndim - output_vector.ndim  # window axes and the input-channel axis
    output_vector = _to_channels_last(output_vector, n_window - 1, layout)
    v = output_vector.reshape(output_vector.shape[:-1] + (1,) * n_window + output_vector.shape[-1:])
    scaled = {"kernel": kernel * v}
    if has_bias:
        scaled["bias"] = trace["bias"] * output_vector
    return scaled


def conv_trace_to_dw(dtrace, w, *, has_bias, layout, **_):
    """Sum a contracted unshared trace over the output positions: the kernel's (bias's) gradient."""
    n = w["kernel"].ndim - 2
    axes = tuple(range(n))
    kernel = dtrace["kernel"].sum(axes)  # (*window, in, out)
    if layout == "channels_first":
        kernel = jnp.transpose(kernel, (n + 1, n) + axes)
    dw = {"kernel": kernel}
    if has_bias:
        dw["bias"] = dtrace["bias"].sum(axes).reshape(w["bias"].shape)
    return dw


def conv_xy_to_dw(x, y_cotangent, w, **params):
    """The op's VJP w.r.t. ``{'kernel', 'bias'}`` at input ``x`` (summed over the batch)."""
    names = _trainables(params)
    order = sorted(names, key=names.get)

    def apply(*trainables):
        return _conv_impl(x, *trainables, **params)

    y, vjp = jax.vjp(apply, *(w[k] for k in order))
    grads = vjp(y_cotangent.astype(y.dtype))
    return {k: g.astype(w[k].dtype) for k, g in zip(order, grads)}


def _taps(x_shape, y_shape, window, input_index, params) -> tuple:
    """Static: per element ``j`` of one sample's ``y``, the kernel tap ``(*w, c, o)``
    linking ``x[input_index[j]]`` to ``y[j]`` and whether there is one (channels-last)."""
    n = len(window)
    index = np.asarray(input_index).reshape(-1)
    ys = np.stack(np.unravel_index(np.arange(index.size), y_shape))  # (n + 1, Y)
    xs = np.stack(np.unravel_index(np.maximum(index, 0), x_shape))
    if params["layout"] == "channels_first":  # channel first: move it last
        ys, xs = np.roll(ys, -1, axis=0), np.roll(xs, -1, axis=0)
    spatial = x_shape[1:] if params["layout"] == "channels_first" else x_shape[:-1]
    dilation = params["rhs_dilation"]
    padding = params["padding"]
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
        padding = lax.padtype_to_pads(spatial, dilated, params["strides"], padding)
    valid = index >= 0
    taps = []
    for d in range(n):
        offset = xs[d] - ys[d] * params["strides"][d] + padding[d][0]
        tap, rest = np.divmod(offset, dilation[d])
        valid &= (rest == 0) & (tap >= 0) & (tap < window[d])
        taps.append(np.clip(tap, 0, window[d] - 1))
    channel = 0 if params["layout"] == "channels_first" else -1
    c_in, c_out = x_shape[channel], y_shape[channel]
    groups = params["feature_group_count"]
    c, o = xs[n], ys[n]
    valid &= c // (c_in // groups) == o // (c_out // groups)
    return tuple(taps) + (c % (c_in // groups), o), valid


def conv_input_entries(x, kernel, *bias, input_index, **params):
    """``dy[j] / dx[input_index[j]]``: the kernel tap linking that input to ``y[j]`` (0 if none)."""
    if params["dtype"] is not None:
        kernel = kernel.astype(params["dtype"])
    n = kernel.ndim - 2
    sample = x.shape[1:] if x.ndim == n + 2 else x.shape
    struct = jax.ShapeDtypeStruct(sample, kernel.dtype)
    y_shape = jax.eval_shape(lambda a: _conv_impl(a, kernel, *bias, **params), struct).shape
    last = _kernel_last(kernel, params["layout"])
    taps, valid = _taps(sample, y_shape, last.shape[:n], input_index, params)
    return jnp.where(jnp.asarray(valid), last[taps], 0)


def _init_drtrl(batched, layout, x_var, y_var, weight_var, num_states):
    lead = (x_var.shape[0],) if batched else ()
    kernel = weight_var["kernel"]
    y_shape = tuple(y_var.shape[len(lead) :])
    if layout == "channels_first":  # y (out, *P), kernel (out, in, *window)
        positions, c_out = y_shape[1:], y_shape[0]
        block = tuple(kernel.shape[2:]) + tuple(kernel.shape[1::-1])
    else:  # y (*P, out), kernel (*window, in, out)
        positions, c_out = y_shape[:-1], y_shape[-1]
        block = tuple(kernel.shape)
    trace = {"kernel": jnp.zeros(lead + positions + block + (num_states,), kernel.dtype)}
    if "bias" in weight_var:
        bias = weight_var["bias"]
        trace["bias"] = jnp.zeros(lead + positions + (c_out, num_states), bias.dtype)
    return trace


def _rules(layout: str, batched: bool) -> dict:
    return dict(
        yw_to_w=conv_yw_to_w,
        xy_to_dw=conv_xy_to_dw,
        init_drtrl=functools.partial(_init_drtrl, batched, layout),
        init_pp=init_output_trace,
        xy_to_trace=conv_xy_to_trace,
        trace_to_dw=conv_trace_to_dw,
        input_entries=conv_input_entries,
    )


etp_conv, etp_conv_batched = register_pair(
    "etp_conv",
    "etp_conv_batched",
    _conv_impl,
    functools.partial(_rules, "channels_last"),
    trainable_invars_fn=_trainables,
)
#: The channels-first twins (Equinox's layout: ``x (C, *spatial)``, kernel ``(out, in, *window)``).
etp_conv_cf, etp_conv_cf_batched = register_pair(
    "etp_conv_cf",
    "etp_conv_cf_batched",
    _conv_impl,
    functools.partial(_rules, "channels_first"),
    trainable_invars_fn=_trainables,
)
_PRIMITIVES = {  # (layout, batched) -> primitive
    ("channels_last", False): etp_conv,
    ("channels_last", True): etp_conv_batched,
    ("channels_first", False): etp_conv_cf,
    ("channels_first", True): etp_conv_cf_batched,
}


def conv_trace_sizes(x_shape, y_shape, kernel_shape, num_states: int = 1) -> dict:
    """Elements per sample of each trace of one conv op (unbatched shapes).

    Parameters
    ----------
    x_shape, y_shape : tuple of int
        One sample's input ``(*spatial, C_in)`` and output ``(*out_spatial, C_out)``.
    kernel_shape : tuple of int
        ``(*window, C_in // G, C_out)``.
    num_states : int
        States ``S`` the op's output drives.

    Returns
    -------
    dict
        ``{'d_rtrl': positions * (|kernel| + C_out) * S, 'pp_prop': |x| + |y| * S}``
        (the D-RTRL count includes the bias's unshared trace).

    Examples
    --------
    >>> from braintrace.ops.conv import conv_trace_sizes
    >>> conv_trace_sizes((8, 8, 2), (4, 4, 3), (3, 3, 2, 3))
    {'d_rtrl': 912, 'pp_prop': 176}
    """
    positions = math.prod(y_shape[:-1])
    d_rtrl = positions * (math.prod(kernel_shape) + y_shape[-1]) * num_states
    return {"d_rtrl": d_rtrl, "pp_prop": math.prod(x_shape) + math.prod(y_shape) * num_states}


def _spatial_tuple(name: str, value: Any, n: int) -> tuple[int, ...]:
    """``value`` (``None``, an int or ``n`` ints, each >= 1) as a tuple of ``n`` ints."""
    if value is None:
        return (1,) * n
    out = (value,) * n if isinstance(value, int) else tuple(value)
    if len(out) != n or not all(isinstance(v, int) and v >= 1 for v in out):
        raise ValueError(
            f"{_OP}: {name} must be an int >= 1 or {n} such ints (one per spatial axis), "
            f"got {value!r}."
        )
    return out


def _padding(value: Any, n: int) -> str | tuple[tuple[int, int], ...]:
    """A padding name, or explicit ``(low, high)`` pairs as a hashable tuple."""
    if isinstance(value, str):
        if value.upper() not in PADDINGS:
            raise ValueError(
                f"{_OP}: padding must be one of {PADDINGS} or {n} (low, high) pairs, got "
                f"{value!r}. Pad x yourself first (e.g. jnp.pad(x, ..., mode='wrap') for "
                "circular padding) and pass padding='VALID'."
            )
        return value.upper()
    try:
        pairs = tuple((int(lo), int(hi)) for lo, hi in value)
    except (TypeError, ValueError):
        pairs = ()
    if len(pairs) != n:
        raise ValueError(
            f"{_OP}: padding must be one of {PADDINGS} or {n} (low, high) pairs (one per "
            f"spatial axis), got {value!r}."
        )
    return pairs


#: ``layout -> (x, kernel)`` as the errors describe them.
_LAYOUT_TEXT = {
    "channels_last": ("(*spatial, C_in)", "(*window, C_in // feature_group_count, C_out)"),
    "channels_first": ("(C_in, *spatial)", "(C_out, C_in // feature_group_count, *window)"),
}


def _check_shapes(x, kernel, bias, groups: int, layout: str) -> None:
    n = kernel.ndim - 2
    x_text, k_text = _LAYOUT_TEXT[layout]
    _checks.check_ndim(
        _OP, "x", x, (n + 1, n + 2), f"{x_text} or batch-first, with the kernel's {n} spatial axes"
    )
    first = layout == "channels_first"
    c_in = x.shape[-n - 1] if first else x.shape[-1]
    c_out, k_in = (kernel.shape[0], kernel.shape[1]) if first else kernel.shape[:-3:-1]
    if not isinstance(groups, int) or groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(
            f"{_OP}: feature_group_count must be an int >= 1 dividing both x's channels "
            f"({c_in}) and the kernel's output channels ({c_out}), got {groups!r}."
        )
    if k_in * groups != c_in:
        raise ValueError(
            f"{_OP}: the kernel's input-channel axis is {k_in}, but x has {c_in} channels and "
            f"feature_group_count={groups}, so it must be {c_in // groups}; the kernel's layout "
            f"is {k_text} (layout={layout!r})."
        )
    want = (c_out,) + (1,) * n if first else (c_out,)
    if bias is not None and bias.shape != want:
        raise ValueError(
            f"{_OP}: bias must have shape {want} (the kernel's output channels, layout="
            f"{layout!r}), got {tuple(bias.shape)}."
        )


@_checks.checked_signature(_OP)
def conv(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    strides: int | Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    rhs_dilation: int | Sequence[int] | None = None,
    feature_group_count: int = 1,
    dtype: Any = None,
    precision: Any = None,
    layout: str = "channels_last",
) -> jax.Array:
    """N-d convolution as an ETP op, channels-last (Flax's layout) or channels-first.

    ``y = lax.conv_general_dilated(x, kernel, ...) (+ bias)`` with ``x``
    ``(..., *spatial, C_in)`` and ``kernel`` ``(*window, C_in // G, C_out)``.

    Trace memory per sample and per state ``S`` (``P`` output positions,
    ``K = prod(window) * C_in // G`` entries per output channel): D-RTRL keeps an
    unshared trace, ``P * (K + 1) * C_out`` (one kernel-shaped block per output
    position: exact, since ``D`` acts per output element); pp_prop keeps the input,
    ``|x|``, once per op, and ``P * C_out`` per state (``docs/algorithms.md``,
    "Convolution").

    Parameters
    ----------
    x : Array
        ``(*spatial, C_in)`` (binds ``etp_conv``) or ``(batch, *spatial, C_in)`` (binds
        ``etp_conv_batched``).
    kernel : Array
        ``(*window, C_in // feature_group_count, C_out)``, trainable.
    bias : Array, optional
        ``(C_out,)``, trainable, added at every output position.
    strides : int or sequence of int, optional
        Window strides per spatial axis (default 1).
    padding : {'SAME', 'VALID', 'SAME_LOWER'} or sequence of (int, int)
        As ``lax.conv_general_dilated``; explicit ``(low, high)`` pairs per spatial axis.
    rhs_dilation : int or sequence of int, optional
        Kernel dilation per spatial axis (default 1).
    feature_group_count : int
        ``G``: input and output channels split into ``G`` independent groups.
    dtype : dtype, optional
        Compute dtype (operands are cast inside the op). ``None`` requires matching dtypes.
    precision : jax.lax.Precision, optional
        Passed to ``lax.conv_general_dilated``.
    layout : {'channels_last', 'channels_first'}
        ``'channels_first'`` is Equinox's: ``x (..., C_in, *spatial)``, ``kernel (C_out,
        C_in // G, *window)``, ``bias (C_out, 1, ..., 1)``, ``y (..., C_out, *out_spatial)``
        (binds ``etp_conv_cf`` / ``etp_conv_cf_batched``; the traces are the same).

    Returns
    -------
    Array
        ``(*out_spatial, C_out)`` or ``(batch, *out_spatial, C_out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> ops.conv(jnp.ones((2, 8, 8, 2)), jnp.ones((3, 3, 2, 4)), strides=2).shape
    (2, 4, 4, 4)
    >>> float(ops.conv(jnp.ones((5, 1)), jnp.ones((3, 1, 1)), padding="VALID")[0, 0])
    3.0
    """
    x = _checks.as_array(_OP, "x", x)
    kernel = _checks.as_array(_OP, "kernel", kernel)
    if kernel.ndim < 3:
        raise ValueError(
            f"{_OP}: kernel must be (*window, C_in // feature_group_count, C_out) with at "
            f"least one spatial axis, got shape {tuple(kernel.shape)}."
        )
    bias = None if bias is None else _checks.as_array(_OP, "bias", bias)
    if layout not in ("channels_last", "channels_first"):
        raise ValueError(
            f"{_OP}: layout must be 'channels_last' or 'channels_first', got {layout!r}."
        )
    _check_shapes(x, kernel, bias, feature_group_count, layout)
    n = kernel.ndim - 2
    dtype = _checks.common_dtype(_OP, dtype, x=x, kernel=kernel, bias=bias)
    if all(a is None or a.dtype == dtype for a in (x, kernel, bias)):
        dtype = None  # nothing to cast: keep the equation free of no-op params
    prim = _PRIMITIVES[layout, x.ndim == n + 2]
    operands = (x, kernel) if bias is None else (x, kernel, bias)
    return prim.bind(
        *operands,
        strides=_spatial_tuple("strides", strides, n),
        padding=_padding(padding, n),
        rhs_dilation=_spatial_tuple("rhs_dilation", rhs_dilation, n),
        feature_group_count=feature_group_count,
        has_bias=bias is not None,
        dtype=dtype,
        precision=precision,
        layout=layout,
    )
