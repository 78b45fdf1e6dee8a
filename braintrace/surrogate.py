"""Heaviside spike with a smooth surrogate derivative, and the LIF neuron built on it.

Framework-agnostic: the linen, NNX and Equinox LIF cells all step :func:`lif_step`,
so they are one neuron. ``spike`` is a ``custom_jvp``, which the compiler
differentiates through with the surrogate.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["spike", "lif_step", "decay_logit"]


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


def lif_step(v, i, drive, a, *, syn_decay: float, threshold: float, slope: float):
    """One step of the leaky integrate-and-fire neuron of every braintrace face.

    ``i_t = syn_decay * i + drive``; ``v_t = a * v * (1 - spike(v - threshold)) +
    (1 - a) * i_t`` (the reset uses the previous step's spike). Returns
    ``(v_t, i_t)``; the output spikes are ``spike(v_t - threshold, slope)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.surrogate import lif_step
    >>> v, i = lif_step(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), 0.9,
    ...                 syn_decay=0.8, threshold=1.0, slope=4.0)
    >>> [round(float(u), 3) for u in v], i.tolist()
    ([0.1, 0.1], [1.0, 1.0])
    """
    i = syn_decay * i + drive
    v = a * v * (1.0 - spike(v - threshold, slope)) + (1.0 - a) * i
    return v, i


def decay_logit(mem_decay: float, where: str) -> float:
    """``log(a / (1 - a))``: the stored weight whose sigmoid is the decay ``a``.

    ``where`` names the cell in the error raised for a decay outside (0, 1).

    Examples
    --------
    >>> from braintrace.surrogate import decay_logit
    >>> decay_logit(0.5, "ETPLIFCell")
    0.0
    """
    if not 0.0 < mem_decay < 1.0:
        raise ValueError(f"{where}: mem_decay must be in (0, 1), got {mem_decay!r}.")
    return math.log(mem_decay / (1.0 - mem_decay))
