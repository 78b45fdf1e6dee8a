"""Dense ETP op: ``y = x @ W (+ b)``, unbatched (``etp_mv``) and batched (``etp_mm``).

Trainables ``{'weight', 'bias'}``. ``weight_layout='in_out'`` takes a Flax-style
``(in, out)`` kernel; ``'out_in'`` takes an Equinox-style ``(out, in)`` weight as the
primitive's own operand, so no transpose sits between the parameter and the op.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks
from ._pair import register_pair, weight_and_bias

__all__ = ["dense", "etp_mv", "etp_mm", "WEIGHT_LAYOUTS"]

WEIGHT_LAYOUTS = ("in_out", "out_in")
_OP = "braintrace.ops.dense"


def _dense_impl(x, weight, *bias, weight_layout, has_bias, dtype, precision):
    del has_bias
    x, weight, *bias = _checks.cast(dtype, x, weight, *bias)
    w_contract = 0 if weight_layout == "in_out" else 1
    y = lax.dot_general(x, weight, (((x.ndim - 1,), (w_contract,)), ((), ())), precision=precision)
    if bias:
        y = y + bias[0]
    return y


_trainables = weight_and_bias("weight")


# -- rules (shared by the batched and unbatched primitives) --------------------
# ``...`` is the batch axis for etp_mm and nothing for etp_mv; rules that return a
# gradient sum over it, as the op's VJP does.


def _outer(x, h, weight_layout, precision):
    """``sum_b x[b] (x) h[b]`` in the kernel's layout (an outer product for one row)."""
    spec = "...i,...k->ik" if weight_layout == "in_out" else "...i,...k->ki"
    return jnp.einsum(spec, x, h, precision=precision)


def _sum_lead(h):
    return h.reshape((-1, h.shape[-1])).sum(0)


def dense_yw_to_w(output_vector, trace, *, weight_layout, has_bias, **_):
    """Scale a weight-shaped trace along its output axis by ``output_vector``."""
    v = output_vector
    out_axis = v[..., None, :] if weight_layout == "in_out" else v[..., :, None]
    scaled = {"weight": trace["weight"] * out_axis}
    if has_bias:
        scaled["bias"] = trace["bias"] * output_vector
    return scaled


def dense_xy_to_dw(x, y_cotangent, w, *, weight_layout, has_bias, precision, **_):
    """VJP of the op w.r.t. ``{'weight', 'bias'}`` at input ``x``, cotangent ``y_cotangent``."""
    dw = {"weight": _outer(x, y_cotangent, weight_layout, precision).astype(w["weight"].dtype)}
    if has_bias:
        dw["bias"] = _sum_lead(y_cotangent).astype(w["bias"].dtype)
    return dw


def entries_at(matrix, input_index, weight_layout="in_out"):
    """``matrix[input_index[j], j]`` (``[j, input_index[j]]`` for ``'out_in'``), 0 where < 0.

    ``input_index`` is static (numpy); the picked entries are one gather.
    """
    index = np.asarray(input_index).reshape(-1)
    outputs = np.arange(index.size)
    safe = np.where(index < 0, 0, index)
    rows, cols = (safe, outputs) if weight_layout == "in_out" else (outputs, safe)
    return jnp.where(jnp.asarray(index >= 0), matrix[rows, cols], 0)


def dense_input_entries(x, weight, *bias, input_index, weight_layout, dtype, **_):
    """``dy[j] / dx[input_index[j]]``: the weight's entry linking that input to ``y[j]``."""
    (weight,) = _checks.cast(dtype, weight)
    return entries_at(weight, input_index, weight_layout)


def _zeros_with_states(lead, var, num_states):
    return jnp.zeros(lead + tuple(var.shape) + (num_states,), var.dtype)


def _init_drtrl(batched, x_var, y_var, weight_var, num_states):
    lead = (x_var.shape[0],) if batched else ()
    return {k: _zeros_with_states(lead, v, num_states) for k, v in weight_var.items()}


def init_output_trace(x_var, y_var, weight_var, num_states):
    """pp_prop's output-side trace: zeros of ``y``'s shape plus a state axis."""
    return _zeros_with_states((), y_var, num_states)


def _rules(batched: bool) -> dict:
    return dict(
        yw_to_w=dense_yw_to_w,
        xy_to_dw=dense_xy_to_dw,
        init_drtrl=functools.partial(_init_drtrl, batched),
        init_pp=init_output_trace,
        input_entries=dense_input_entries,
    )


etp_mv, etp_mm = register_pair(
    "etp_mv", "etp_mm", _dense_impl, _rules, trainable_invars_fn=_trainables
)


@_checks.checked_signature(_OP)
def dense(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    weight_layout: str = "in_out",
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """Dense layer as an ETP op: ``y = x @ W (+ b)``.

    Parameters
    ----------
    x : Array
        Input of shape ``(in,)`` (binds ``etp_mv``) or ``(batch, in)`` (binds ``etp_mm``).
    weight : Array
        ``(in, out)`` for ``weight_layout='in_out'``, ``(out, in)`` for ``'out_in'``.
    bias : Array, optional
        ``(out,)``.
    weight_layout : {'in_out', 'out_in'}
        Layout of ``weight``; ``'out_in'`` is Equinox's.
    dtype : dtype, optional
        Compute dtype; operands are cast inside the op (so the weight still reaches
        the op as the raw parameter). ``None`` requires matching operand dtypes.
    precision : jax.lax.Precision, optional
        Passed to ``lax.dot_general``.

    Returns
    -------
    Array
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> ops.dense(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4)).shape
    (2, 4)
    """
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(
            f"{_OP}: weight_layout must be one of {WEIGHT_LAYOUTS}, got {weight_layout!r}."
        )
    x = _checks.as_array(_OP, "x", x)
    weight = _checks.as_array(_OP, "weight", weight)
    _checks.check_ndim(_OP, "x", x, (1, 2), "(in,) or (batch, in)")
    _checks.check_ndim(_OP, "weight", weight, (2,), f"2-D ({weight_layout.replace('_', ', ')})")
    n_in, n_out = weight.shape if weight_layout == "in_out" else weight.shape[::-1]
    _checks.check_dim(
        _OP, f"x's last axis must match weight's 'in' axis ({weight_layout})", x.shape[-1], n_in
    )
    if bias is not None:
        bias = _checks.as_array(_OP, "bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(
                f"{_OP}: bias must have shape ({n_out},) to match weight, got {tuple(bias.shape)}."
            )
    dtype = _checks.common_dtype(_OP, dtype, x=x, weight=weight, bias=bias)
    if all(a is None or a.dtype == dtype for a in (x, weight, bias)):
        dtype = None  # nothing to cast: keep the equation free of no-op params
    prim = etp_mv if x.ndim == 1 else etp_mm
    operands = (x, weight) if bias is None else (x, weight, bias)
    return prim.bind(
        *operands,
        weight_layout=weight_layout,
        has_bias=bias is not None,
        dtype=dtype,
        precision=precision,
    )
