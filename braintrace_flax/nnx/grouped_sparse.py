"""NNX layers for the grouped and sparse dense ETP ops: :class:`ETPGroupedLinear`,
:class:`ETPSparseLinear`.

Both follow ``nnx.Linear``'s conventions (``in_features, out_features``, ``use_bias``,
``dtype``, ``param_dtype``, initialisers, ``rngs``; ``nnx.Param`` variables) and hand the
raw parameter values to :func:`braintrace.ops.grouped_dense` /
:func:`braintrace.ops.sparse_dense`, so the braintrace compiler traces them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from braintrace import ops
from braintrace.ops.sparse import SparsePattern

__all__ = ["ETPGroupedLinear", "ETPSparseLinear"]

Array = jax.Array
Initializer = Callable[..., Array]

_LECUN_PER_BLOCK = nnx.initializers.lecun_normal(batch_axis=0)
_ZEROS = nnx.initializers.zeros_init()


def _fold(name: str, inputs: Array, in_features: int, dtype: Any, *arrays: Array | None):
    """``(x cast and folded to (in,) or (batch, in), leading shape, compute dtype)``."""
    x = jnp.asarray(inputs)
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{name}: inputs must have shape (..., {in_features}), got {tuple(x.shape)}."
        )
    dtype = nnx_dtypes.canonicalize_dtype(x, *arrays, dtype=dtype)
    lead = x.shape[:-1]
    x = x.astype(dtype)
    if x.ndim > 2:
        x = x.reshape((-1, in_features))
    return x, lead, dtype


class ETPGroupedLinear(nnx.Module):
    """A grouped (block-diagonal) linear layer whose kernel trains by eligibility traces.

    The input's last axis is split into ``groups`` equal slices, each mapped by its own
    block ``kernel[g]`` of shape ``(in // groups, out // groups)``
    (:func:`braintrace.ops.grouped_dense`). D-RTRL's trace is kernel-sized.

    Parameters
    ----------
    in_features, out_features : int
        Sizes, both multiples of ``groups``.
    groups : int
        Number of independent blocks.
    use_bias : bool
        Whether to add ``bias (out_features,)``.
    dtype : dtype, optional
        Computation dtype (default: promote inputs and params).
    param_dtype : dtype
        Parameter dtype (default ``float32``).
    precision : jax.lax.Precision, optional
        Passed to the contraction.
    kernel_init : initializer
        Default ``lecun_normal(batch_axis=0)`` (each block's own fan-in).
    bias_init : initializer
        Default zeros.
    rngs : nnx.Rngs
        Supplies the ``params`` keys.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPGroupedLinear(4, 6, groups=2, rngs=nnx.Rngs(0))
    >>> layer.kernel.shape, layer(jnp.ones((5, 4))).shape
    ((2, 2, 3), (5, 6))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = _LECUN_PER_BLOCK,
        bias_init: Initializer = _ZEROS,
        rngs: nnx.Rngs,
    ):
        name = f"ETPGroupedLinear({in_features}, {out_features}, groups={groups})"
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(
                f"{name}: in_features and out_features must be multiples of groups (>= 1); "
                "change groups or the sizes."
            )
        shape = (groups, in_features // groups, out_features // groups)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        self.bias = nnx.data(bias)
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.dtype, self.precision = dtype, precision

    def __call__(self, inputs: Array) -> Array:
        """``inputs @ block_diagonal(kernel) (+ bias)`` over the last axis."""
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        name = f"ETPGroupedLinear({self.in_features}, {self.out_features}, groups={self.groups})"
        x, lead, dtype = _fold(name, inputs, self.in_features, self.dtype, kernel, bias)
        y = ops.grouped_dense(x, kernel, bias, dtype=dtype, precision=self.precision)
        return y.reshape(lead + (self.out_features,))


class ETPSparseLinear(nnx.Module):
    """A linear layer with fixed sparse connectivity whose non-zeros train by traces.

    ``y = x @ W (+ bias)``, ``W (in_features, out_features)`` zero except at the static
    ``(input, output)`` pairs of ``indices`` (:func:`braintrace.ops.sparse_dense`). The
    ``nnx.Param`` s are ``values (nnz,)`` and ``bias (out_features,)``; D-RTRL's trace
    lives on the non-zeros (``nnz x S`` per sample).

    Parameters
    ----------
    in_features, out_features : int
        Shape of the dense weight.
    indices : array_like of int
        ``(nnz, 2)`` static ``(row, col)`` pairs inside ``(in_features, out_features)``.
    use_bias : bool
        Whether to add a bias.
    dtype : dtype, optional
        Computation dtype (default: promote inputs and params).
    param_dtype : dtype
        Parameter dtype (default ``float32``).
    values_init : initializer, optional
        Default ``normal(1 / sqrt(nnz / out_features))`` (LeCun's scale with the mean
        number of connections per output as fan-in).
    bias_init : initializer
        Default zeros.
    rngs : nnx.Rngs
        Supplies the ``params`` keys.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPSparseLinear(4, 3, [[0, 0], [1, 2], [3, 1]], rngs=nnx.Rngs(0))
    >>> layer.values.shape, layer(jnp.ones((2, 4))).shape
    ((3,), (2, 3))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        indices: Any,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        values_init: Initializer | None = None,
        bias_init: Initializer = _ZEROS,
        rngs: nnx.Rngs,
    ):
        name = f"ETPSparseLinear({in_features}, {out_features})"
        self.pattern = SparsePattern.from_indices(indices, (in_features, out_features), op=name)
        init = values_init or nnx.initializers.normal(1.0 / math.sqrt(self.pattern.mean_fan_in))
        self.values = nnx.Param(init(rngs.params(), (self.pattern.nnz,), param_dtype))
        bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        self.bias = nnx.data(bias)
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype

    def __call__(self, inputs: Array) -> Array:
        """``inputs @ W (+ bias)`` over the last axis, ``W`` scattered from ``values``."""
        values = self.values.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        name = f"ETPSparseLinear({self.in_features}, {self.out_features})"
        x, lead, dtype = _fold(name, inputs, self.in_features, self.dtype, values, bias)
        shape = (self.in_features, self.out_features)
        y = ops.sparse_dense(x, values, self.pattern, shape, bias, dtype=dtype)
        return y.reshape(lead + (self.out_features,))
