"""Einsum ETP op: ``y = einsum(spec, x, w) (+ b)``, one data operand and one weight.

Unbatched ``etp_einsum`` and batched ``etp_einsum_batched`` (the batch axis leads
``x`` and ``y`` and is not written in the op's ``spec``). Trainables ``{'weight',
'bias'}``. The subscripts of one sample fall into four kinds: contracted (in ``x`` and
``w``, not in ``y``), shared (in all three: a batch-like axis of the weight), free
``x`` axes (in ``x`` and ``y`` only) and free ``w`` axes (in ``w`` and ``y`` only).

A weight entry feeds every output along the free ``x`` axes while ``D`` acts per
output element, so a weight-shaped D-RTRL trace is exact only without free ``x``
axes (a dense op). The exact trace keeps them: its subscripts are the free ``x``
axes followed by ``w``'s, ``prod(free x sizes) * |w| * S`` numbers per sample, and
``trace_to_dw`` sums them out. A bias (``y``'s subscripts that ``w`` has, as
``flax.linen.Einsum`` makes it) keeps a ``y``-shaped trace. pp_prop keeps ``x`` and a
``y``-shaped output trace. ``docs/algorithms.md``, "Einsum".
"""

from __future__ import annotations

import functools
import math
import string
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _checks
from ._pair import register_pair, weight_and_bias
from .dense import init_output_trace

__all__ = [
    "einsum",
    "etp_einsum",
    "etp_einsum_batched",
    "EinsumSpec",
    "parse_spec",
    "trace_numbers",
]

_OP = "braintrace.ops.einsum"


class EinsumSpec(NamedTuple):
    """One sample's subscripts, parsed: ``x``, ``w`` and ``y``'s, and the trace's.

    Attributes
    ----------
    x, w, y : str
        Subscripts of ``x``, the weight and the output (one sample).
    trace : str
        Subscripts of the weight's D-RTRL trace: free ``x`` axes, then ``w``'s.
    bias : str
        Subscripts of the bias: ``y``'s letters that ``w`` has, in ``y``'s order.
    batch : str
        A letter used by none of them (the batched primitive's batch axis).
    """

    x: str
    w: str
    y: str
    trace: str
    bias: str
    batch: str


@functools.lru_cache(maxsize=128)
def parse_spec(spec: str) -> EinsumSpec:
    """Parse ``'x,w->y'`` (explicit, no ellipsis) and check it is one the op can trace."""
    where = f"{_OP}: spec {spec!r}"
    if spec.count("->") != 1:
        raise ValueError(f"{where} must be explicit: 'x_subscripts,w_subscripts->y_subscripts'.")
    lhs, y = spec.split("->")
    operands = lhs.split(",")
    if len(operands) != 2:
        raise ValueError(
            f"{where} has {len(operands)} operands; the op takes exactly two, the data x and "
            "one trainable weight w. Split a product of several weights into one einsum op "
            "per weight (or precompute the constant operands into x)."
        )
    x, w = operands
    for name, subs in (("x", x), ("w", w), ("y", y)):
        if "." in subs or not all(c in string.ascii_letters for c in subs):
            raise ValueError(f"{where}: {name}'s subscripts must be letters (no ellipsis).")
        if len(set(subs)) != len(subs):
            raise ValueError(f"{where}: {name}'s subscripts repeat a letter (a diagonal).")
    if set(y) - set(x) - set(w):
        raise ValueError(f"{where}: y has letters in neither x nor w.")
    summed_w = sorted(set(w) - set(x) - set(y))
    if summed_w:
        raise ValueError(
            f"{where}: w's axes {summed_w} are summed out; sum the weight outside the op."
        )
    free_x = "".join(c for c in x if c in y and c not in w)
    unused = [c for c in string.ascii_letters if c not in x + w + y]
    bias = "".join(c for c in y if c in w)
    return EinsumSpec(x, w, y, free_x + w, bias, unused[0])


def _lead(spec: EinsumSpec, batched: bool) -> str:
    return spec.batch if batched else ""


def _einsum_impl(x, weight, *bias, spec, has_bias, dtype, precision, preferred_element_type):
    del has_bias
    s = parse_spec(spec)
    b = _lead(s, x.ndim == len(s.x) + 1)
    x, weight, *bias = _checks.cast(dtype, x, weight, *bias)
    y = jnp.einsum(
        f"{b}{s.x},{s.w}->{b}{s.y}",
        x,
        weight,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if bias:
        shape = (1,) * len(b) + tuple(weight.shape[s.w.index(c)] if c in s.w else 1 for c in s.y)
        y = y + jnp.reshape(bias[0], shape)
    return y


_trainables = weight_and_bias("weight")


# -- rules: ``batched`` is bound per primitive; its gradient rules sum over the batch --------


def einsum_yw_to_w(batched, output_vector, trace, *, spec, has_bias, **_):
    """Scale the trace along ``y``'s subscripts by the ``y``-shaped vector."""
    s = parse_spec(spec)
    b = _lead(s, batched)
    out = {
        "weight": jnp.einsum(f"{b}{s.trace},{b}{s.y}->{b}{s.trace}", trace["weight"], output_vector)
    }
    if has_bias:
        out["bias"] = trace["bias"] * output_vector
    return out


def einsum_xy_to_trace(batched, x, y_cotangent, w, *, spec, has_bias, precision, **_):
    """Instantaneous D-RTRL term in trace space (free ``x`` axes kept, batch summed)."""
    s = parse_spec(spec)
    b = _lead(s, batched)
    dtype = y_cotangent.dtype
    term = {
        "weight": jnp.einsum(
            f"{b}{s.x},{b}{s.y}->{s.trace}", x.astype(dtype), y_cotangent, precision=precision
        )
    }
    if has_bias:
        term["bias"] = y_cotangent.sum(0) if batched else y_cotangent
    return term


def einsum_trace_to_dw(dtrace, w, *, spec, has_bias, **_):
    """Sum a contracted trace over its free ``x`` axes (linear)."""
    s = parse_spec(spec)
    dw = {"weight": jnp.einsum(f"{s.trace}->{s.w}", dtrace["weight"]).astype(w["weight"].dtype)}
    if has_bias:
        dw["bias"] = jnp.einsum(f"{s.y}->{s.bias}", dtrace["bias"]).astype(w["bias"].dtype)
    return dw


def einsum_xy_to_dw(batched, x, y_cotangent, w, *, spec, has_bias, precision, **_):
    """VJP w.r.t. ``{'weight', 'bias'}`` at input ``x`` and cotangent ``y_cotangent``."""
    s = parse_spec(spec)
    b = _lead(s, batched)
    dtype = w["weight"].dtype
    g = y_cotangent
    dw = {
        "weight": jnp.einsum(
            f"{b}{s.x},{b}{s.y}->{s.w}", x.astype(g.dtype), g, precision=precision
        ).astype(dtype)
    }
    if has_bias:
        dw["bias"] = jnp.einsum(f"{b}{s.y}->{s.bias}", g).astype(w["bias"].dtype)
    return dw


def einsum_init_drtrl(batched, x_var, y_var, weight_var, num_states, *, spec, **_):
    """Zeros of the trace: ``(*lead, *free_x, *w.shape, S)``, bias ``(*lead, *y, S)``."""
    s = parse_spec(spec)
    lead = tuple(x_var.shape[:1]) if batched else ()
    x_shape = tuple(x_var.shape[len(lead) :])
    sizes = dict(zip(s.x, x_shape)) | dict(zip(s.w, weight_var["weight"].shape))
    dtype = weight_var["weight"].dtype
    out = {"weight": jnp.zeros(lead + tuple(sizes[c] for c in s.trace) + (num_states,), dtype)}
    if "bias" in weight_var:
        out["bias"] = jnp.zeros(tuple(y_var.shape) + (num_states,), weight_var["bias"].dtype)
    return out


def _rules(batched: bool) -> dict:
    return dict(
        yw_to_w=functools.partial(einsum_yw_to_w, batched),
        xy_to_dw=functools.partial(einsum_xy_to_dw, batched),
        init_drtrl=functools.partial(einsum_init_drtrl, batched),
        init_pp=init_output_trace,
        xy_to_trace=functools.partial(einsum_xy_to_trace, batched),
        trace_to_dw=einsum_trace_to_dw,
    )


etp_einsum, etp_einsum_batched = register_pair(
    "etp_einsum", "etp_einsum_batched", _einsum_impl, _rules, trainable_invars_fn=_trainables
)


def trace_numbers(spec: str, x_shape: tuple, w_shape: tuple) -> int:
    """Numbers in one sample's D-RTRL weight trace per state: ``prod(free x) * |w|``.

    Examples
    --------
    >>> from braintrace.ops.einsum import trace_numbers
    >>> trace_numbers("li,ihd->lhd", (4, 3), (3, 2, 5))  # 4 positions x |w| = 30
    120
    """
    s = parse_spec(spec.replace(" ", ""))
    sizes = dict(zip(s.x, x_shape)) | dict(zip(s.w, w_shape))
    return math.prod(sizes[c] for c in s.trace)


def _split_batch(spec: str, x: jax.Array, batched: bool | None) -> tuple[str, bool]:
    """The per-sample spec and whether ``x``'s first axis is the batch axis."""
    s = parse_spec(spec)
    lead = s.x[:1]
    batch_like = bool(lead) and lead not in s.w and s.y[:1] == lead
    if batched is None:
        batched = batch_like
    if not batched:
        return spec, False
    if not batch_like:
        raise ValueError(
            f"{_OP}: batched=True needs x's first subscript to be a batch axis (not in w, "
            f"first in y); spec {spec!r} has {lead!r}. Pass batched=False."
        )
    return f"{s.x[1:]},{s.w}->{s.y[1:]}", True


def _check_operands(spec: str, x: jax.Array, weight: jax.Array, bias) -> None:
    s = parse_spec(spec)
    if len(s.x) != x.ndim:
        raise ValueError(
            f"{_OP}: spec {spec!r} gives x {len(s.x)} axes, but x has shape {tuple(x.shape)}."
        )
    if len(s.w) != weight.ndim:
        raise ValueError(
            f"{_OP}: spec {spec!r} gives w {len(s.w)} axes, but weight has shape "
            f"{tuple(weight.shape)}."
        )
    for c in set(s.x) & set(s.w):
        nx, nw = x.shape[s.x.index(c)], weight.shape[s.w.index(c)]
        if nx != nw:
            raise ValueError(
                f"{_OP}: axis {c!r} of spec {spec!r} is {nx} in x but {nw} in weight; "
                "they must match."
            )
    if bias is not None:
        want = tuple(weight.shape[s.w.index(c)] for c in s.bias)
        if tuple(bias.shape) != want:
            raise ValueError(
                f"{_OP}: bias must have shape {want} (the axes of y that w has, {s.bias!r}), "
                f"got {tuple(bias.shape)}."
            )


@_checks.checked_signature(_OP)
def einsum(
    spec: str,
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    batched: bool | None = None,
    dtype: Any = None,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``jnp.einsum(spec, x, weight) (+ bias)`` as an ETP op with a trainable weight.

    Parameters
    ----------
    spec : str
        ``'x_subscripts,w_subscripts->y_subscripts'``: explicit, letters only, exactly
        two operands (the data ``x`` first, the weight second), no weight axis summed.
    x : Array
        The data operand.
    weight : Array
        The trainable operand.
    bias : Array, optional
        Shaped like the axes of ``y`` that ``weight`` has (in ``y``'s order), broadcast
        over the others, as ``flax.linen.Einsum`` makes it.
    batched : bool, optional
        Whether ``x``'s first axis is the batch axis (it must not be in ``weight``
        and must lead ``y``). Default: exactly when it can be; pass ``False`` in a
        step written for one sample.
    dtype : dtype, optional
        Compute dtype (operands are cast inside the op).
    precision, preferred_element_type : optional
        Passed to ``jnp.einsum``.

    Returns
    -------
    Array
        ``jnp.einsum(spec, x, weight)`` plus the broadcast bias.

    Notes
    -----
    D-RTRL memory per sample and state: ``prod(free x axes) * |weight|`` for the
    weight (a free ``x`` axis is in ``x`` and ``y`` only; :func:`trace_numbers`) plus
    ``|y|`` for the bias; pp_prop: ``|x| + |y| S``. ``docs/algorithms.md``, "Einsum".

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> x, w = jnp.ones((2, 4, 3)), jnp.ones((3, 5))
    >>> ops.einsum("bli,io->blo", x, w, jnp.zeros(5)).shape
    (2, 4, 5)
    """
    if not isinstance(spec, str):
        raise TypeError(f"{_OP}: spec must be a str such as 'bi,io->bo', got {spec!r}.")
    spec = spec.replace(" ", "")
    x = _checks.as_array(_OP, "x", x)
    weight = _checks.as_array(_OP, "weight", weight)
    bias = None if bias is None else _checks.as_array(_OP, "bias", bias)
    _check_operands(spec, x, weight, bias)
    sample_spec, batched = _split_batch(spec, x, batched)
    dtype = _checks.common_dtype(_OP, dtype, x=x, weight=weight, bias=bias)
    if all(a is None or a.dtype == dtype for a in (x, weight, bias)):
        dtype = None
    operands = (x, weight) if bias is None else (x, weight, bias)
    return (etp_einsum_batched if batched else etp_einsum).bind(
        *operands,
        spec=sample_spec,
        has_bias=bias is not None,
        dtype=dtype,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
