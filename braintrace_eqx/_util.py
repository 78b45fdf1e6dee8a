"""Small helpers shared by the Equinox layers (not public)."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

# Shapes only: filter_eval_shape never draws from it.
_SKELETON_KEY = jax.random.PRNGKey(0)


def array_fields(module: eqx.Module) -> list[str]:
    """The non-static fields of ``module`` that hold an array (``None`` left out)."""
    return [
        f.name
        for f in dataclasses.fields(module)
        if not f.metadata.get("static", False) and getattr(module, f.name) is not None
    ]


def rebuild(cls: type[eqx.Module], source: eqx.Module, *args: Any, **kwargs: Any) -> Any:
    """``cls(*args, **kwargs, key=...)`` holding ``source``'s arrays, without initialising any.

    ``cls`` and ``type(source)`` have the same array fields (an ETP layer and its
    Equinox twin); ``args``/``kwargs`` give ``cls`` the same static fields. The module
    is built abstractly (``eqx.filter_eval_shape``) and its arrays are put in with
    ``eqx.tree_at``, so shapes and dtypes are checked and nothing is drawn at random.
    """
    skeleton = eqx.filter_eval_shape(cls, *args, key=_SKELETON_KEY, **kwargs)
    names = array_fields(source)
    if names != array_fields(skeleton):
        raise TypeError(
            f"braintrace_eqx: cannot build {cls.__qualname__} from a {type(source).__qualname__} "
            f"with arrays {names}; it has {array_fields(skeleton)} (an Equinox version this "
            "adapter does not know?). Please report it."
        )
    for name in names:
        want, got = getattr(skeleton, name), getattr(source, name)
        if (want.shape, want.dtype) != (jnp.shape(got), jnp.result_type(got)):
            raise ValueError(
                f"braintrace_eqx: {type(source).__qualname__}.{name} is "
                f"{jnp.result_type(got)}{list(jnp.shape(got))}, but {cls.__qualname__} expects "
                f"{want.dtype}{list(want.shape)}."
            )
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names], skeleton, [getattr(source, n) for n in names]
    )


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
