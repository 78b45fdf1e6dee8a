"""LoRA ETP op: ``y = x @ W0 + scale * (x @ A) @ B (+ b)``.

Trainables ``{'lora_a' (in, r), 'lora_b' (r, out), 'bias' (out,)}`` (Flax NNX's names);
the frozen base weight ``W0`` is an operand the traces do not train.

The D-RTRL trace lives on the *effective* weight ``W = W0 + s A B`` (``in x out x S``,
smaller than a trace on ``A`` and ``B``) and is chained to ``A`` and ``B`` at solve
time by :func:`lora_trace_to_dw`. That is exact: ``h`` depends on ``A, B`` only
through ``W``, and the chain ``dW -> (s dW B^T, s A^T dW)`` is linear, so summing over
time commutes with it. The extra rule slots ``xy_to_trace`` and ``trace_to_dw``
(see :mod:`braintrace.registry`) carry this.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from . import _checks
from ._pair import register_pair
from .dense import _init_drtrl, _outer, _sum_lead, entries_at, init_output_trace

__all__ = ["lora", "etp_lora_mv", "etp_lora_mm"]

_OP = "braintrace.ops.lora"


def _lora_impl(x, lora_a, lora_b, *rest, scale, has_bias, has_base, dtype=None):
    x, lora_a, lora_b, *rest = _checks.cast(dtype, x, lora_a, lora_b, *rest)
    y = scale * ((x @ lora_a) @ lora_b)
    if has_base:
        y = y + x @ rest[-1]
    if has_bias:
        y = y + rest[0]
    return y


def _trainables(params):
    names = {"lora_a": 1, "lora_b": 2}
    if params["has_bias"]:
        names["bias"] = 3
    return names


def lora_xy_to_dw(x, y_cotangent, w, *, scale, has_bias, **_):
    """VJP of the op w.r.t. ``{'lora_a', 'lora_b', 'bias'}``."""
    a, b = w["lora_a"], w["lora_b"]
    dw = {
        "lora_a": scale * jnp.einsum("...i,...r->ir", x, y_cotangent @ b.T),
        "lora_b": scale * jnp.einsum("...r,...k->rk", x @ a, y_cotangent),
    }
    if has_bias:
        dw["bias"] = _sum_lead(y_cotangent)
    return {k: v.astype(w[k].dtype) for k, v in dw.items()}


def lora_xy_to_trace(x, y_cotangent, w, *, has_bias, **_):
    """Instantaneous D-RTRL term on the effective weight (and bias)."""
    trace = {"weight": _outer(x, y_cotangent, "in_out", None)}
    if has_bias:
        trace["bias"] = _sum_lead(y_cotangent)
    return trace


def lora_yw_to_w(output_vector, trace, *, has_bias, **_):
    """Scale the effective-weight trace along its output axis."""
    scaled = {"weight": trace["weight"] * output_vector[..., None, :]}
    if has_bias:
        scaled["bias"] = trace["bias"] * output_vector
    return scaled


def lora_trace_to_dw(dtrace, w, *, scale, has_bias, **_):
    """Chain a contracted effective-weight trace ``dW`` to ``A`` and ``B`` (linear)."""
    dw_eff = dtrace["weight"]
    dw = {
        "lora_a": scale * dw_eff @ w["lora_b"].T,
        "lora_b": scale * w["lora_a"].T @ dw_eff,
    }
    if has_bias:
        dw["bias"] = dtrace["bias"]
    return dw


def lora_input_entries(x, lora_a, lora_b, *rest, input_index, scale, has_base, dtype=None, **_):
    """``dy[j] / dx[input_index[j]]``: the effective weight ``W0 + s A B``'s entry."""
    lora_a, lora_b, *rest = _checks.cast(dtype, lora_a, lora_b, *rest)
    effective = scale * (lora_a @ lora_b)
    if has_base:
        effective = effective + rest[-1]
    return entries_at(effective, input_index)


def _init_lora_drtrl(batched, x_var, y_var, weight_var, num_states):
    a = weight_var["lora_a"]
    eff = {"weight": jax.ShapeDtypeStruct((a.shape[0], y_var.shape[-1]), a.dtype)}
    if "bias" in weight_var:
        eff["bias"] = weight_var["bias"]
    return _init_drtrl(batched, x_var, y_var, eff, num_states)


def _rules(batched: bool) -> dict:
    return dict(
        yw_to_w=lora_yw_to_w,
        xy_to_dw=lora_xy_to_dw,
        init_drtrl=functools.partial(_init_lora_drtrl, batched),
        init_pp=init_output_trace,
        xy_to_trace=lora_xy_to_trace,
        trace_to_dw=lora_trace_to_dw,
        input_entries=lora_input_entries,
    )


etp_lora_mv, etp_lora_mm = register_pair(
    "etp_lora_mv", "etp_lora_mm", _lora_impl, _rules, trainable_invars_fn=_trainables
)


def _static_scale(scale: Any) -> float:
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise TypeError(
            f"{_OP}: scale must be a static Python float (it is a primitive parameter), "
            f"got {type(scale).__name__}."
        ) from err


@_checks.checked_signature(_OP)
def lora(
    x: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale: float = 1.0,
    base_weight: jax.Array | None = None,
    dtype: Any = None,
) -> jax.Array:
    """Low-rank adapted dense layer as an ETP op.

    ``y = x @ base_weight + scale * (x @ lora_a) @ lora_b (+ bias)``.

    Parameters
    ----------
    x : Array
        ``(in,)`` (binds ``etp_lora_mv``) or ``(batch, in)`` (binds ``etp_lora_mm``).
    lora_a : Array
        ``(in, r)``, trainable.
    lora_b : Array
        ``(r, out)``, trainable.
    bias : Array, optional
        ``(out,)``, trainable.
    scale : float
        Static scale ``s`` of the low-rank update.
    base_weight : Array, optional
        Frozen ``(in, out)`` base kernel; an operand that traces do not train.
    dtype : dtype, optional
        Compute dtype; operands are cast inside the op (the trainables still reach
        it as raw parameters). ``None`` requires matching operand dtypes.

    Returns
    -------
    Array
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> ops.lora(jnp.ones(3), jnp.ones((3, 2)), jnp.ones((2, 4)), scale=0.5).tolist()
    [3.0, 3.0, 3.0, 3.0]
    """
    x = _checks.as_array(_OP, "x", x)
    lora_a = _checks.as_array(_OP, "lora_a", lora_a)
    lora_b = _checks.as_array(_OP, "lora_b", lora_b)
    _checks.check_ndim(_OP, "x", x, (1, 2), "(in,) or (batch, in)")
    _checks.check_ndim(_OP, "lora_a", lora_a, (2,), "2-D (in, r)")
    _checks.check_ndim(_OP, "lora_b", lora_b, (2,), "2-D (r, out)")
    n_in, rank = lora_a.shape
    n_out = lora_b.shape[1]
    _checks.check_dim(_OP, "x's last axis must match lora_a's 'in' axis", x.shape[-1], n_in)
    _checks.check_dim(_OP, "lora_b's 'r' axis must match lora_a's rank", lora_b.shape[0], rank)
    if bias is not None:
        bias = _checks.as_array(_OP, "bias", bias)
        if bias.shape != (n_out,):
            raise ValueError(f"{_OP}: bias must have shape ({n_out},), got {tuple(bias.shape)}.")
    if base_weight is not None:
        base_weight = _checks.as_array(_OP, "base_weight", base_weight)
        if base_weight.shape != (n_in, n_out):
            raise ValueError(
                f"{_OP}: base_weight must have shape ({n_in}, {n_out}) (in, out), got "
                f"{tuple(base_weight.shape)}."
            )
    dtype = _checks.common_dtype(
        _OP, dtype, x=x, lora_a=lora_a, lora_b=lora_b, bias=bias, base_weight=base_weight
    )
    if all(a is None or a.dtype == dtype for a in (x, lora_a, lora_b, bias, base_weight)):
        dtype = None  # nothing to cast: keep the equation free of no-op params
    scale = _static_scale(scale)
    prim = etp_lora_mv if x.ndim == 1 else etp_lora_mm
    operands = [x, lora_a, lora_b]
    if bias is not None:
        operands.append(bias)
    if base_weight is not None:
        operands.append(base_weight)
    return prim.bind(
        *operands,
        scale=scale,
        has_bias=bias is not None,
        has_base=base_weight is not None,
        dtype=dtype,
    )
