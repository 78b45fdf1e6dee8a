"""Equinox convolutions backed by the ETP conv op: ``ETPConv``, ``ETPConv1d``, ``ETPConv2d``.

Each subclasses its ``eqx.nn`` counterpart and changes only ``__call__``: the fields
(``weight (out, in // groups, *kernel_size)``, ``bias (out, 1, ..., 1)``, the static
options), the initialisation for a key and the outputs are Equinox's. The weight and
bias reach :func:`braintrace.ops.conv` unchanged (``layout='channels_first'``).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from braintrace import ops

from ._util import rebuild

__all__ = ["ETPConv", "ETPConv1d", "ETPConv2d"]


def _forward(layer: eqx.nn.Conv, x: Array) -> Array:
    """``eqx.nn.Conv.__call__``'s computation through the ETP conv op (one sample or a batch)."""
    where = f"braintrace_eqx.{type(layer).__name__}"
    x = jnp.asarray(x)
    if x.ndim not in (layer.num_spatial_dims + 1, layer.num_spatial_dims + 2):
        raise ValueError(
            f"{where}: x must be (in_channels, *spatial) with {layer.num_spatial_dims} spatial "
            f"axes (or batch-first), got shape {tuple(x.shape)}. Use jax.vmap over a batch."
        )
    padding = layer.padding
    if layer.padding_mode != "ZEROS":  # Equinox pads one sample; map it over a batch
        pad = layer._nonzero_pad
        x = pad(x) if x.ndim == layer.num_spatial_dims + 1 else eqx.filter_vmap(pad)(x)
        padding = "VALID"
    dtype = jnp.result_type(x, layer.weight)
    x = x.astype(dtype)  # the input is not a parameter: cast it here
    try:
        return ops.conv(
            x,
            layer.weight,
            layer.bias if layer.use_bias else None,
            strides=tuple(layer.stride),
            padding=padding,
            rhs_dilation=tuple(layer.dilation),
            feature_group_count=layer.groups,
            dtype=None if layer.weight.dtype == dtype else dtype,
            layout="channels_first",
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}: {err}") from None


class ETPConv(eqx.nn.Conv):
    """Twin of :class:`equinox.nn.Conv` whose weight and bias train by eligibility traces.

    Same constructor, fields, initial values and outputs as ``eqx.nn.Conv``
    (every ``padding`` and ``padding_mode``); ``x`` is ``(in_channels, *spatial)`` for
    one sample (``jax.vmap`` over a batch keeps the op visible), or batch-first.
    :func:`braintrace_eqx.from_eqx` / :func:`~braintrace_eqx.to_eqx` convert whole
    models. Trace memory: see :func:`braintrace.ops.conv`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> conv = bte.ETPConv(2, 2, 4, 3, stride=2, padding="SAME", key=key)
    >>> ref = eqx.nn.Conv(2, 2, 4, 3, stride=2, padding="SAME", key=key)
    >>> x = jnp.ones((2, 8, 8))
    >>> bool((conv(x) == ref(x)).all()), conv(x).shape
    (True, (4, 4, 4))
    """

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """Convolve ``x`` (channels first) through the ETP conv op; ``key`` is ignored."""
        del key
        return _forward(self, x)

    @classmethod
    def from_eqx(cls, conv: eqx.nn.Conv) -> eqx.nn.Conv:
        """The ETP twin of an ``eqx.nn.Conv`` (``Conv1d``, ``Conv2d``, ...): same arrays."""
        if not isinstance(conv, eqx.nn.Conv):
            raise TypeError(
                f"braintrace_eqx.{cls.__name__}.from_eqx expects an equinox.nn.Conv, got "
                f"{type(conv).__name__}."
            )
        twin = _TWINS.get(type(conv), ETPConv)
        return rebuild(twin, conv, *_static_args(conv, twin))

    def to_eqx(self) -> eqx.nn.Conv:
        """The plain Equinox convolution with the same arrays."""
        plain = next(p for p, e in _TWINS.items() if e is type(self))
        return rebuild(plain, self, *_static_args(self, plain))


class ETPConv1d(ETPConv, eqx.nn.Conv1d):
    """Twin of :class:`equinox.nn.Conv1d` (see :class:`ETPConv`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> x = jnp.ones((2, 9))
    >>> conv, ref = bte.ETPConv1d(2, 3, 3, key=key), eqx.nn.Conv1d(2, 3, 3, key=key)
    >>> bool((conv(x) == ref(x)).all())
    True
    """


class ETPConv2d(ETPConv, eqx.nn.Conv2d):
    """Twin of :class:`equinox.nn.Conv2d` (see :class:`ETPConv`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> x = jnp.ones((2, 6, 6))
    >>> conv, ref = bte.ETPConv2d(2, 3, 3, key=key), eqx.nn.Conv2d(2, 3, 3, key=key)
    >>> bool((conv(x) == ref(x)).all())
    True
    """


#: Equinox convolution -> its ETP twin (exact types).
_TWINS = {eqx.nn.Conv: ETPConv, eqx.nn.Conv1d: ETPConv1d, eqx.nn.Conv2d: ETPConv2d}


def _static_args(conv: eqx.nn.Conv, target: type) -> tuple:
    """Positional constructor arguments of ``target`` that rebuild ``conv``'s static fields."""
    rest = (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.use_bias,
        conv.padding_mode,
        conv.weight.dtype,
    )
    if target in (eqx.nn.Conv, ETPConv):
        return (conv.num_spatial_dims,) + rest
    return rest
