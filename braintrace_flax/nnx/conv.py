"""NNX convolution backed by the ETP conv op: :class:`ETPConv`, a twin of ``nnx.Conv``."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from .. import _conv
from .layers import _compute_dtype

__all__ = ["ETPConv"]

Array = jax.Array


class ETPConv(nnx.Conv):
    """Twin of ``flax.nnx.Conv`` whose kernel and bias train by eligibility traces.

    Same constructor, the same ``Param`` s (``kernel (*kernel_size, in //
    feature_group_count, out)``, ``bias (out,)``) with the same values for the same
    ``rngs``, and the same outputs bit for bit; only ``__call__`` changes, running
    :func:`braintrace.ops.conv`. :func:`braintrace_flax.nnx.convert` turns an
    ``nnx.Conv`` into this class in place. Every padding ``nnx.Conv`` takes works;
    ``input_dilation`` must stay 1, ``mask``, ``preferred_element_type`` and
    ``out_sharding`` ``None`` and ``conv_general_dilated`` the default (an error says
    so). Trace memory: see :func:`braintrace.ops.conv`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPConv(2, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
    >>> stock = nnx.Conv(2, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((1, 8, 8, 2))
    >>> bool((layer(x) == stock(x)).all()), layer(x).shape
    (True, (1, 4, 4, 4))
    """

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Convolve ``inputs`` (channels last) through the ETP conv op."""
        owner = f"ETPConv({self.in_features}, {self.out_features}, {self.kernel_size})"
        window = tuple(self.kernel_size)
        n = len(window)
        _conv.check_options(
            owner,
            input_dilation=_conv.spatial(self.input_dilation, n),
            mask=self.mask,
            custom=self._unsupported(out_sharding),
        )
        x, batch_shape = _conv.fold_batch(owner, inputs, n)
        dilation = _conv.spatial(self.kernel_dilation, n)
        x, padding = _conv.pad_inputs(owner, x, self.padding, window, dilation)
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        y = _conv.conv_call(
            owner,
            x,
            kernel,
            bias,
            _compute_dtype(self, x, kernel, bias),
            strides=_conv.spatial(self.strides, n),
            padding=padding,
            rhs_dilation=dilation,
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        return y if batch_shape is None else y.reshape(batch_shape + y.shape[1:])

    def _unsupported(self, out_sharding: Any) -> str | None:
        if self.conv_general_dilated is not jax.lax.conv_general_dilated:
            return f"conv_general_dilated={self.conv_general_dilated!r}"
        if self.preferred_element_type is not None:
            return f"preferred_element_type={self.preferred_element_type!r}"
        if out_sharding is not None:
            return f"out_sharding={out_sharding!r}"
        return None
