"""Input validation shared by the built-in ops: errors name the op and the fix."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax.numpy as jnp
import numpy as np


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
