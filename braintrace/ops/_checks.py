"""Input validation shared by the built-in ops: errors name the op and the fix."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr


def as_array(op: str, name: str, value: Any) -> jnp.ndarray:
    """``value`` as a floating JAX array, or a ``TypeError`` naming ``op``."""
    if value is None:
        raise TypeError(f"{op}: {name} is required, got None.")
    try:
        arr = jnp.asarray(value)
    except TypeError as err:
        raise TypeError(f"{op}: {name} must be an array, got {type(value).__name__}.") from err
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        raise TypeError(
            f"{op}: {name} must have a floating dtype, got {arr.dtype}; cast it with "
            f"{name}.astype(jnp.float32)."
        )
    return arr


def check_ndim(op: str, name: str, arr: jnp.ndarray, allowed: tuple[int, ...], what: str) -> None:
    if arr.ndim not in allowed:
        raise ValueError(f"{op}: {name} must be {what}, got shape {tuple(arr.shape)}.")


def check_dim(op: str, what: str, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"{op}: {what}: expected {expected}, got {got}.")


def common_dtype(op: str, dtype: Any, **arrays: jnp.ndarray | None) -> np.dtype:
    """The compute dtype: ``dtype`` if given, else the operands' shared dtype."""
    if dtype is not None:
        out = np.dtype(dtype)
        if not jnp.issubdtype(out, jnp.inexact):
            raise TypeError(f"{op}: dtype must be a floating dtype, got {out}.")
        return out
    present = {k: v.dtype for k, v in arrays.items() if v is not None}
    kinds = set(present.values())
    if len(kinds) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in present.items())
        raise TypeError(
            f"{op}: operands have different dtypes ({listed}); cast them to one dtype, or "
            "pass dtype=... to compute in that dtype inside the op."
        )
    return np.dtype(next(iter(kinds)))


def cast(dtype: Any, *arrays: jax.Array) -> tuple:
    """``arrays`` in the compute ``dtype`` (an op's ``dtype=`` parameter; ``None``: as they are)."""
    if dtype is None:
        return arrays
    return tuple(a.astype(dtype) for a in arrays)


def checked_signature(op: str):
    """Decorate a public op so a wrong call names the op and shows its signature."""

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{op}: {err}; expected {fn.__name__}{sig}.") from None
            return fn(*args, **kwargs)

        return call

    return wrap


#: Primitives whose outputs mix array positions (reductions, scans, contractions,
#: permutations, slicing and gathering, collectives). Any of them in an
#: "elementwise" map means some output entry reads other entries of the input.
_POSITION_MIXING = frozenset(
    """
    argmax argmin approx_top_k top_k sort cumsum cumprod cummax cummin cumlogsumexp
    reduce reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor
    reduce_window reduce_window_sum reduce_window_max reduce_window_min
    select_and_scatter select_and_scatter_add select_and_gather_add
    dot_general conv_general_dilated fft transpose rev pad concatenate split tile
    slice dynamic_slice dynamic_update_slice gather scatter scatter-add scatter-sub
    scatter-mul scatter-min scatter-max psum pmax pmin ppermute all_gather all_to_all
    custom_linear_solve
    """.split()
)


def _sub_jaxprs(params) -> list:
    found = []
    for value in params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(sub, ClosedJaxpr):
                found.append(sub.jaxpr)
            elif isinstance(sub, Jaxpr):
                found.append(sub)
    return found


def position_mixing(jaxpr: Jaxpr) -> list[str]:
    """Names of the position-mixing primitives in ``jaxpr`` (recursively)."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _POSITION_MIXING:
            names.append(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn.params):
            names.extend(position_mixing(sub))
    return names


def check_elementwise(op: str, fn: Any, arg: jax.Array) -> None:
    """Refuse ``fn`` unless it keeps ``arg``'s shape and mixes no positions.

    A cheap structural guard, not a proof: ``fn`` is traced once per (``fn``, shape,
    dtype) on an abstract ``arg``, and a shape-preserving map made of per-position
    primitives (``tanh``, ``logistic``, ``select_n``, ...) is accepted, while one
    that contains a reduction, a cumulative scan (``cumsum``), a contraction, a
    permutation or a slice is refused. (A ``lax.scan`` over the weight's entries
    is not detected.)
    """
    try:
        problem = _elementwise_problem(fn, tuple(arg.shape), np.dtype(arg.dtype))
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        problem = _elementwise_problem.__wrapped__(fn, tuple(arg.shape), np.dtype(arg.dtype))
    if problem:
        raise ValueError(f"{op}: fn must be elementwise {problem}")


@functools.lru_cache(maxsize=256)
def _elementwise_problem(fn: Any, shape: tuple, dtype: np.dtype) -> str | None:
    closed, out = jax.make_jaxpr(fn, return_shape=True)(jax.ShapeDtypeStruct(shape, dtype))
    if not hasattr(out, "shape") or tuple(out.shape) != shape:
        got = getattr(out, "shape", type(out).__name__)
        return f"(same output shape as weight {shape}), got {got}."
    mixing = sorted(set(position_mixing(closed.jaxpr)))
    if mixing:
        return (
            f"(each output entry a function of the same weight entry only), but it uses "
            f"{mixing}, which mix positions; apply such maps to the op's output instead."
        )
    return None
