"""Grouped dense ETP op: ``G`` independent dense blocks, a block-diagonal weight.

``y = x W_bd (+ b)`` where ``W_bd`` is block-diagonal with blocks ``weight[g]`` of shape
``(in // G, out // G)``: block ``g`` maps the ``g``-th slice of ``x`` to the ``g``-th slice of
``y``. Unbatched (``etp_grouped_mv``) and batched (``etp_grouped_mm``) primitives, trainables
``{'weight' (G, in // G, out // G), 'bias' (out,)}``.

Every weight entry ``weight[g, i, k]`` feeds one output, ``y[g * (out // G) + k]``, so a
weight-shaped D-RTRL trace scaled along its output axis is exact, as for dense:
``G * (in // G) * (out // G) * S`` numbers per sample, ``1 / G`` of a dense layer of the same
size. pp_prop keeps ``epsx`` (``in``) and ``epsf`` (``out x S``). See ``docs/algorithms.md``,
"Grouped and sparse dense".
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from ._pair import register_pair, weight_and_bias
from .dense import WEIGHT_LAYOUTS, _init_drtrl, _sum_lead, entries_at, init_output_trace

__all__ = ["grouped_dense", "etp_grouped_mv", "etp_grouped_mm", "block_diagonal"]

_OP = "braintrace.ops.grouped_dense"


def _split(a, groups):
    """``(..., n)`` to ``(..., groups, n // groups)``."""
    return a.reshape(a.shape[:-1] + (groups, a.shape[-1] // groups))


def _block_spec(weight_layout):
    """The weight's einsum letters: ``g`` group, ``i`` input, ``k`` output."""
    return "gik" if weight_layout == "in_out" else "gki"


def _grouped_impl(x, weight, *bias, weight_layout, has_bias, dtype, precision):
    del has_bias
    x, weight, *bias = _checks.cast(dtype, x, weight, *bias)
    spec = f"...gi,{_block_spec(weight_layout)}->...gk"
    y = jnp.einsum(spec, _split(x, weight.shape[0]), weight, precision=precision)
    y = y.reshape(y.shape[:-2] + (-1,))
    if bias:
        y = y + bias[0]
    return y


_trainables = weight_and_bias("weight")


# -- rules (shared by both primitives; ``...`` is the batch axis of etp_grouped_mm) ----------


def grouped_yw_to_w(output_vector, trace, *, weight_layout, has_bias, **_):
    """Scale a grouped weight-shaped trace by the output vector of its group."""
    v = _split(output_vector, trace["weight"].shape[-3])
    v = v[..., :, None, :] if weight_layout == "in_out" else v[..., :, :, None]
    scaled = {"weight": trace["weight"] * v}
    if has_bias:
        scaled["bias"] = trace["bias"] * output_vector
    return scaled


def grouped_xy_to_dw(x, y_cotangent, w, *, weight_layout, has_bias, precision, **_):
    """VJP w.r.t. ``{'weight', 'bias'}``: per block the outer product of its input and output."""
    groups = w["weight"].shape[0]
    spec = f"...gi,...gk->{_block_spec(weight_layout)}"
    prod = jnp.einsum(spec, _split(x, groups), _split(y_cotangent, groups), precision=precision)
    dw = {"weight": prod}
    if has_bias:
        dw["bias"] = _sum_lead(y_cotangent)
    return {k: v.astype(w[k].dtype) for k, v in dw.items()}


def block_diagonal(weight: jax.Array, weight_layout: str = "in_out") -> jax.Array:
    """The ``(in, out)`` block-diagonal matrix of a grouped weight.

    ``weight`` is ``(G, in // G, out // G)`` (``'in_out'``) or ``(G, out // G, in // G)``
    (``'out_in'``); the result is ``(in, out)`` either way.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.ops.grouped import block_diagonal
    >>> block_diagonal(jnp.ones((2, 1, 2))).tolist()
    [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    """
    if weight_layout != "in_out":
        weight = jnp.swapaxes(weight, 1, 2)
    groups, group_in, group_out = weight.shape
    eye = jnp.eye(groups, dtype=weight.dtype)
    full = jnp.einsum("gh,gik->gihk", eye, weight)
    return full.reshape(groups * group_in, groups * group_out)


def grouped_input_entries(x, weight, *bias, input_index, weight_layout, dtype, **_):
    """``dy[j] / dx[input_index[j]]``: the block-diagonal weight's entry (0 off the blocks)."""
    if dtype is not None:
        weight = weight.astype(dtype)
    return entries_at(block_diagonal(weight, weight_layout), input_index)


def _rules(batched: bool) -> dict:
    return dict(
        yw_to_w=grouped_yw_to_w,
        xy_to_dw=grouped_xy_to_dw,
        init_drtrl=functools.partial(_init_drtrl, batched),
        init_pp=init_output_trace,
        input_entries=grouped_input_entries,
    )


etp_grouped_mv, etp_grouped_mm = register_pair(
    "etp_grouped_mv", "etp_grouped_mm", _grouped_impl, _rules, trainable_invars_fn=_trainables
)


def _check_shapes(x, weight, bias, weight_layout) -> None:
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(
            f"{_OP}: weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}."
        )
    in_out = weight_layout == "in_out"
    blocks = "in // groups, out // groups" if in_out else "out // groups, in // groups"
    _checks.check_ndim(_OP, "weight", weight, (3,), f"3-D (groups, {blocks})")
    _checks.check_ndim(_OP, "x", x, (1, 2), "(in,) or (batch, in)")
    groups, group_in, group_out = weight.shape if in_out else (weight.shape[i] for i in (0, 2, 1))
    if x.shape[-1] != groups * group_in:
        raise ValueError(
            f"{_OP}: x's last axis ({x.shape[-1]}) must equal groups * (in // groups) = "
            f"{groups} * {group_in} = {groups * group_in} from weight's shape "
            f"{tuple(weight.shape)}; give weight the shape (groups, {blocks})."
        )
    if bias is not None and bias.shape != (groups * group_out,):
        raise ValueError(
            f"{_OP}: bias must have shape ({groups * group_out},) (out = groups * out // groups "
            f"from weight's shape {tuple(weight.shape)}), got {tuple(bias.shape)}."
        )


@_checks.checked_signature(_OP)
def grouped_dense(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    weight_layout: str = "in_out",
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """Grouped (block-diagonal) dense layer as an ETP op.

    ``x`` is split into ``G`` equal slices along its last axis; slice ``g`` is multiplied by
    block ``g`` of ``weight`` and the ``G`` results are concatenated:
    ``y = x @ block_diagonal(weight) (+ b)``.

    Memory of the traces per sample (``S`` states per output): D-RTRL ``|weight| * S`` (the
    weight-shaped trace is exact, each entry feeds one output), pp_prop ``in + out * S``.

    Parameters
    ----------
    x : Array
        ``(in,)`` (binds ``etp_grouped_mv``) or ``(batch, in)`` (binds ``etp_grouped_mm``).
    weight : Array
        ``(G, in // G, out // G)`` for ``weight_layout='in_out'``, ``(G, out // G, in // G)``
        for ``'out_in'`` (Equinox's per-block layout, handed to the op untransposed).
    bias : Array, optional
        ``(out,)`` with ``out = G * (out // G)``.
    weight_layout : {'in_out', 'out_in'}
        Layout of each block of ``weight``.
    dtype : dtype, optional
        Compute dtype; operands are cast inside the op. ``None`` requires matching dtypes.
    precision : jax.lax.Precision, optional
        Passed to the contraction.

    Returns
    -------
    Array
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> ops.grouped_dense(jnp.array([1.0, 2.0]), jnp.ones((2, 1, 3))).tolist()
    [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    """
    x = _checks.as_array(_OP, "x", x)
    weight = _checks.as_array(_OP, "weight", weight)
    if bias is not None:
        bias = _checks.as_array(_OP, "bias", bias)
    _check_shapes(x, weight, bias, weight_layout)
    dtype = _checks.common_dtype(_OP, dtype, x=x, weight=weight, bias=bias)
    if all(a is None or a.dtype == dtype for a in (x, weight, bias)):
        dtype = None  # nothing to cast: keep the equation free of no-op params
    prim = etp_grouped_mv if x.ndim == 1 else etp_grouped_mm
    operands = (x, weight) if bias is None else (x, weight, bias)
    return prim.bind(
        *operands,
        weight_layout=weight_layout,
        has_bias=bias is not None,
        dtype=dtype,
        precision=precision,
    )
