"""The linear recurrent unit (LRU) of every braintrace face: its step, initialisers, output.

Framework-agnostic: the linen, NNX and Equinox ``ETPLRUCell`` s create their
parameters with the initialisers here and step :func:`lru_step`, so they are one
layer. The math and why D-RTRL is exact inside the layer are in
``docs/algorithms.md`` ("The LRU cell").

One layer has ``H`` complex units ``h = re + i im``, a complex diagonal recurrence
``lambda = exp(-exp(nu_log) + i exp(theta_log))`` and a drive ``u`` from the input::

    h_t = lambda * h_{t-1} + gamma * u_t,      gamma = sqrt(1 - |lambda|^2)

written on real pairs (two hidden leaves ``re`` and ``im`` coupled unit by unit, one
hidden group with ``S = 2``). The drive comes from an ETP dense op (``2H`` outputs:
the real halves, then the imaginary halves), optionally gated; ``|lambda|`` and the
phase come from elementwise ETP ops on ``nu_log`` and ``theta_log``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

__all__ = [
    "magnitude",
    "phase",
    "lru_step",
    "split_drive",
    "lru_output",
    "nu_log_init",
    "theta_log_init",
    "check_ring",
    "DEFAULT_MAX_PHASE",
]

#: Smallest ``1 - |lambda|^2`` the normalisation uses (keeps its gradient finite).
_MIN_GAP = 1e-6
#: Smallest initial phase (``theta_log`` stays finite).
_MIN_PHASE = 1e-4


def magnitude(nu_log: Array) -> Array:
    """``|lambda| = exp(-exp(nu_log))``: in (0, 1) for every real ``nu_log``.

    The elementwise map of the ``nu`` op (a module-level function, so jit caches
    stay warm).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.lru import magnitude
    >>> round(float(magnitude(jnp.log(-jnp.log(0.9)))), 6)
    0.9
    """
    return jnp.exp(-jnp.exp(nu_log))


def phase(theta_log: Array) -> Array:
    """``arg(lambda) = exp(theta_log)``: the rotation per step, in radians.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.lru import phase
    >>> round(float(phase(jnp.log(0.5))), 6)
    0.5
    """
    return jnp.exp(theta_log)


def lru_step(
    re: Array, im: Array, drive_re: Array, drive_im: Array, mag: Array, arg: Array
) -> tuple[Array, Array]:
    """One step of the complex diagonal recurrence on real pairs.

    ``h_t = lambda * h_{t-1} + gamma * u_t`` with ``lambda = mag * exp(i arg)`` and
    ``gamma = sqrt(1 - mag^2)`` (the normalisation that keeps ``|h|`` of the order
    of ``|u|`` however close ``mag`` is to 1). Every operation acts unit by unit.
    Returns ``(re_t, im_t)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.lru import lru_step
    >>> re, im = lru_step(jnp.ones(1), jnp.zeros(1), jnp.zeros(1), jnp.ones(1),
    ...                   jnp.array([0.6]), jnp.array([jnp.pi / 2]))
    >>> [round(float(re[0]), 6), round(float(im[0]), 6)]
    [0.0, 1.4]
    """
    lam_re, lam_im = mag * jnp.cos(arg), mag * jnp.sin(arg)
    gamma = jnp.sqrt(jnp.maximum(1.0 - mag * mag, _MIN_GAP))
    new_re = lam_re * re - lam_im * im + gamma * drive_re
    new_im = lam_re * im + lam_im * re + gamma * drive_im
    return new_re, new_im


def split_drive(u: Array, gate: Array | None = None) -> tuple[Array, Array]:
    """The drive ``(u_re, u_im)`` from a ``(..., 2H)`` projection, optionally gated.

    ``gate`` (pre-activation, like ``u``) multiplies ``u`` by ``sigmoid(gate)``
    position by position (a GLU drive). The split is a static slice, which the
    compiler follows element by element (index maps), so the projection stays exact.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.lru import split_drive
    >>> [v.tolist() for v in split_drive(jnp.arange(4.0), jnp.zeros(4))]
    [[0.0, 0.5], [1.0, 1.5]]
    """
    if gate is not None:
        u = u * jax.nn.sigmoid(gate)
    half = u.shape[-1] // 2
    return u[..., :half], u[..., half:]


def lru_output(re: Array, im: Array, normalize: bool = True, eps: float = 1e-5) -> Array:
    """The layer's output ``(..., 2H)``: ``[re, im]``, layer-normalised by default.

    The normalisation (zero mean, unit variance over the ``2H`` features, no
    parameters) is the next layer's input normalisation, done once here.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace.lru import lru_output
    >>> y = lru_output(jnp.array([1.0, 3.0]), jnp.array([5.0, 7.0]))
    >>> round(float(y.mean()), 6), round(float(y.std()), 3)
    (0.0, 1.0)
    """
    y = jnp.concatenate([re, im], axis=-1)
    if not normalize:
        return y
    mean = y.mean(-1, keepdims=True)
    var = jnp.square(y - mean).mean(-1, keepdims=True)
    return (y - mean) * jax.lax.rsqrt(var + eps)


def check_ring(r_min: float, r_max: float, max_phase: float, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` unless ``0 <= r_min < r_max < 1`` and
    ``max_phase > 0``.

    Examples
    --------
    >>> from braintrace.lru import check_ring
    >>> check_ring(0.0, 0.9, 3.14, "ETPLRUCell(8)")
    """
    if not 0.0 <= r_min < r_max < 1.0:
        raise ValueError(
            f"{where}: the eigenvalue ring needs 0 <= r_min < r_max < 1, got r_min={r_min!r}, "
            f"r_max={r_max!r} (|lambda| = 1 would never forget; pick r_max below 1)."
        )
    if not max_phase > 0.0:
        raise ValueError(f"{where}: max_phase must be positive, got {max_phase!r}.")


def nu_log_init(r_min: float, r_max: float) -> Callable[..., Array]:
    """Initializer ``init(key, shape, dtype)`` of ``nu_log``: ``|lambda|`` on a ring.

    ``|lambda|`` is drawn so that ``lambda`` is uniform over the ring
    ``r_min <= |lambda| <= r_max`` of the complex plane (``|lambda|^2`` uniform in
    ``[r_min^2, r_max^2]``), as in the LRU paper (Orvieto et al., 2023).

    Examples
    --------
    >>> import jax
    >>> from braintrace.lru import magnitude, nu_log_init
    >>> mag = magnitude(nu_log_init(0.5, 0.9)(jax.random.PRNGKey(0), (1000,)))
    >>> bool((mag >= 0.5 - 1e-6).all() and (mag <= 0.9 + 1e-6).all())
    True
    """

    def init(key: Array, shape, dtype=jnp.float32) -> Array:
        u = jax.random.uniform(key, shape, dtype)
        mag_sq = u * (r_max**2 - r_min**2) + r_min**2
        return jnp.log(-0.5 * jnp.log(mag_sq))

    return init


def theta_log_init(max_phase: float) -> Callable[..., Array]:
    """Initializer of ``theta_log``: the phase uniform in ``(0, max_phase]``.

    Examples
    --------
    >>> import jax
    >>> from braintrace.lru import phase, theta_log_init
    >>> arg = phase(theta_log_init(3.0)(jax.random.PRNGKey(0), (1000,)))
    >>> bool((arg > 0).all() and (arg <= 3.0 + 1e-5).all())
    True
    """

    def init(key: Array, shape, dtype=jnp.float32) -> Array:
        u = jax.random.uniform(key, shape, dtype)
        return jnp.log(jnp.maximum(u * max_phase, _MIN_PHASE))

    return init


#: The default ``max_phase`` of the cells: the whole half plane of rotations.
DEFAULT_MAX_PHASE = math.pi
