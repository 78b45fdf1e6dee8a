"""Linen layers for the grouped and sparse dense ETP ops: :class:`ETPGroupedDense`,
:class:`ETPSparseDense`.

Both follow ``nn.Dense``'s conventions (``features``, ``use_bias``, ``dtype``,
``param_dtype``, initialisers, any number of leading input axes) and hand their *raw*
parameters to :func:`braintrace.ops.grouped_dense` / :func:`braintrace.ops.sparse_dense`, so
the braintrace compiler traces them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import dtypes as flax_dtypes

from braintrace import ops
from braintrace.ops.sparse import SparsePattern

from .layers import where

__all__ = ["ETPGroupedDense", "ETPSparseDense"]

Array = jax.Array
Initializer = Callable[..., Array]


def _fold(module: nn.Module, inputs: Array, kernel: Array, bias: Array | None):
    """Cast ``inputs`` to the compute dtype and fold leading axes: ``(x, lead, dtype)``."""
    if jnp.ndim(inputs) == 0:
        raise ValueError(
            f"{where(module)}: inputs must have at least one axis (..., in), got a scalar."
        )
    dtype = flax_dtypes.canonicalize_dtype(inputs, kernel, bias, dtype=module.dtype)
    x = jnp.asarray(inputs, dtype)  # the input is not a parameter: cast it here
    lead = x.shape[:-1]
    if x.ndim > 2:  # the ops take (in,) or (batch, in)
        x = x.reshape((math.prod(lead), x.shape[-1]))
    return x, lead, dtype


class ETPGroupedDense(nn.Module):
    """A grouped (block-diagonal) dense layer whose kernel trains by eligibility traces.

    The input's last axis is split into ``groups`` equal slices; slice ``g`` goes through
    its own ``(in // groups, features // groups)`` block ``kernel[g]`` and the results are
    concatenated (:func:`braintrace.ops.grouped_dense`). As a recurrent weight it keeps
    ``groups`` independent sub-networks. D-RTRL's trace is kernel-sized (``1 / groups`` of a
    dense layer's), and exact where the layer drives a membrane directly.

    Attributes
    ----------
    features : int
        Output features, a multiple of ``groups``.
    groups : int
        Number of blocks; the input size must be a multiple of it.
    use_bias : bool
        Whether to add a bias ``(features,)`` (default ``True``).
    dtype : dtype, optional
        Computation dtype (default: promote inputs and params, as ``nn.Dense``).
    param_dtype : dtype
        Parameter dtype (default ``float32``).
    precision : jax.lax.Precision, optional
        Passed to the contraction.
    kernel_init : initializer
        For ``kernel (groups, in // groups, features // groups)``; the default
        ``lecun_normal(batch_axis=0)`` scales each block by its own fan-in.
    bias_init : initializer
        Default zeros.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPGroupedDense
    >>> layer = ETPGroupedDense(6, groups=2)
    >>> v = layer.init(jax.random.key(0), jnp.ones((5, 4)))
    >>> v['params']['kernel'].shape, layer.apply(v, jnp.ones((5, 4))).shape
    ((2, 2, 3), (5, 6))
    """

    features: int
    groups: int
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = nn.initializers.lecun_normal(batch_axis=0)
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """``inputs @ block_diagonal(kernel) (+ bias)`` over the last axis."""
        n_in = jnp.shape(inputs)[-1] if jnp.ndim(inputs) else 0
        for name, size in (("inputs' last axis", n_in), ("features", self.features)):
            if self.groups < 1 or size % self.groups:
                raise ValueError(
                    f"{where(self)}: {name} ({size}) must be a multiple of groups "
                    f"({self.groups}); change groups or the layer's sizes."
                )
        shape = (self.groups, n_in // self.groups, self.features // self.groups)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, lead, dtype = _fold(self, inputs, kernel, bias)
        y = ops.grouped_dense(x, kernel, bias, dtype=dtype, precision=self.precision)
        return y.reshape(lead + (self.features,))


def _pairs(indices: Any) -> Any:
    """A hashable ``((row, col), ...)`` for array-like indices (a module field is hashed)."""
    if isinstance(indices, (SparsePattern, tuple)):
        return indices
    return tuple(tuple(int(v) for v in pair) for pair in np.asarray(indices).tolist())


class ETPSparseDense(nn.Module):
    """A dense layer with a fixed sparse connectivity whose non-zeros train by traces.

    ``y = x @ W (+ bias)`` where ``W (in, features)`` is zero except at the ``(row, col)``
    = ``(input, output)`` pairs of ``indices`` (:func:`braintrace.ops.sparse_dense`). Only
    ``values (nnz,)`` and ``bias (features,)`` are parameters; the pattern is part of the
    layer. D-RTRL's trace lives on the non-zeros: ``nnz x S`` numbers per sample.

    Attributes
    ----------
    features : int
        Output features.
    indices : array_like of int
        ``(nnz, 2)`` static pairs (a numpy array, a nested list or tuple); the input size
        is read from the input's last axis and every row must be below it.
    use_bias : bool
        Whether to add a bias (default ``True``).
    dtype : dtype, optional
        Computation dtype (default: promote inputs and params).
    param_dtype : dtype
        Parameter dtype (default ``float32``).
    values_init : initializer, optional
        For ``values``; default ``normal(1 / sqrt(nnz / features))``, LeCun's scale with
        the mean number of connections per output as the fan-in.
    bias_init : initializer
        Default zeros.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPSparseDense
    >>> layer = ETPSparseDense(3, indices=[[0, 0], [1, 2], [3, 1]])
    >>> v = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> v['params']['values'].shape, layer.apply(v, jnp.ones((2, 4))).shape
    ((3,), (2, 3))
    """

    features: int
    indices: Any
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    values_init: Initializer | None = None
    bias_init: Initializer = nn.initializers.zeros_init()

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _pairs(self.indices))
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """``inputs @ W (+ bias)`` over the last axis, ``W`` scattered from ``values``."""
        n_in = jnp.shape(inputs)[-1] if jnp.ndim(inputs) else 0
        shape = (n_in, self.features)
        pattern = self.indices
        if not isinstance(pattern, SparsePattern):
            pattern = SparsePattern.from_indices(pattern, shape, op=where(self))
        init = self.values_init or nn.initializers.normal(1.0 / math.sqrt(pattern.mean_fan_in))
        values = self.param("values", init, (pattern.nnz,), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, lead, dtype = _fold(self, inputs, values, bias)
        y = ops.sparse_dense(x, values, pattern, shape, bias, dtype=dtype)
        return y.reshape(lead + (self.features,))
