"""Heaviside spike with a smooth surrogate derivative, for spiking cells.

Framework-agnostic: the Flax and Equinox cells both use it. It is a
``custom_jvp``, which the compiler differentiates through with the surrogate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["spike"]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def spike(v: Array, slope: float = 4.0) -> Array:
    """``1.0`` where ``v > 0`` else ``0.0``, with a fast-sigmoid surrogate derivative.

    The derivative used by ``jax.grad`` (and by braintrace's ``D``) is
    ``1 / (1 + slope * |v|) ** 2``.

    Parameters
    ----------
    v : Array
        Distance to threshold (``v_mem - threshold``).
    slope : float
        Sharpness of the surrogate (static).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace import spike
    >>> spike(jnp.array([-1.0, 0.5])).tolist(), float(jax.grad(spike)(0.0))
    ([0.0, 1.0], 1.0)
    """
    v = jnp.asarray(v)
    return (v > 0).astype(jnp.result_type(v, float))


@spike.defjvp
def _spike_jvp(slope, primals, tangents):
    (v,), (dv,) = primals, tangents
    return spike(v, slope), dv / (1.0 + slope * jnp.abs(v)) ** 2
