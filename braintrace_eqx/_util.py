"""Small helpers shared by the Equinox layers (not public)."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp


def new_module(cls: type[eqx.Module], **fields: Any) -> Any:
    """Build ``cls`` from its field values without running ``__init__``.

    The same route Equinox takes when it unflattens a module, used by the
    conversions (which have the arrays already and no key).
    """
    expected = {f.name for f in dataclasses.fields(cls)}
    if set(fields) != expected:
        raise TypeError(
            f"braintrace_eqx: cannot build {cls.__module__}.{cls.__qualname__} from fields "
            f"{sorted(fields)}; it has {sorted(expected)} (an Equinox version this adapter does "
            "not know?). Please report it."
        )
    obj = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)
    return obj


def floating(where: str, name: str, value: Any) -> jnp.ndarray:
    """``value`` as a floating array, or a ``TypeError`` naming ``where`` and ``name``."""
    arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        raise TypeError(
            f"{where}: {name} must be a floating array, got dtype {arr.dtype}; cast it with "
            f"{name}.astype(jnp.float32)."
        )
    return arr


def check_input(where: str, name: str, x: jnp.ndarray, size: int) -> None:
    """``x`` must be ``(size,)`` (one sample) or ``(batch, size)``."""
    if jnp.ndim(x) not in (1, 2) or jnp.shape(x)[-1] != size:
        raise ValueError(
            f"{where}: {name} must have shape ({size},) for one sample (or (batch, {size})); "
            f"got {tuple(jnp.shape(x))}. Use jax.vmap over a batch of samples."
        )


def promote(x: Any, weight: jnp.ndarray) -> tuple[jnp.ndarray, Any]:
    """Equinox's dtype promotion for ``weight @ x``: ``(x cast, compute dtype or None)``.

    ``x`` is cast (it is not trainable); the weight is cast inside the ETP op
    (``dtype=``), so it still reaches the op as the raw parameter.
    """
    x = jnp.asarray(x)
    dtype = jnp.result_type(x, weight)
    if x.dtype != dtype:
        x = x.astype(dtype)
    return x, (None if weight.dtype == dtype else dtype)
