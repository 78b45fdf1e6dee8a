"""Equinox layers for the grouped and sparse dense ETP ops: :class:`ETPGroupedLinear`,
:class:`ETPSparseLinear`.

Both follow :class:`equinox.nn.Linear`'s conventions (``weight`` in ``(out, in)`` order per
block, ``bias``, a ``key``, uniform ``+-1/sqrt(fan_in)`` initialisation, one sample per
call, ``jax.vmap`` over a batch) and hand their arrays unchanged to
:func:`braintrace.ops.grouped_dense` / :func:`braintrace.ops.sparse_dense`, so the braintrace
compiler traces them.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from braintrace import ops
from braintrace.ops.sparse import SparsePattern

from ._util import check_input, promote

__all__ = ["ETPGroupedLinear", "ETPSparseLinear"]


def _uniform(key: Array, shape: tuple[int, ...], fan_in: float, dtype: Any) -> Array:
    lim = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, minval=-lim, maxval=lim)


def _dtype(dtype: Any) -> Any:
    return jnp.zeros((), dtype).dtype if dtype is not None else jnp.zeros(()).dtype


class ETPGroupedLinear(eqx.Module):
    """A grouped (block-diagonal) linear layer whose weight trains by eligibility traces.

    ``x`` is split into ``groups`` equal slices; slice ``g`` is mapped by block
    ``weight[g]`` of shape ``(out // groups, in // groups)`` (Equinox's ``(out, in)`` order,
    handed to the op untransposed with ``weight_layout='out_in'``).

    Parameters
    ----------
    in_features, out_features : int
        Sizes, both multiples of ``groups``.
    groups : int
        Number of independent blocks.
    use_bias : bool
        Whether to add ``bias (out_features,)``.
    dtype : dtype, optional
        Parameter dtype (Equinox's default floating dtype if ``None``).
    key : Array
        Initialisation key (keyword only); weight and bias are uniform in
        ``+-1/sqrt(in // groups)``, each block's own fan-in.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> layer = bte.ETPGroupedLinear(4, 6, groups=2, key=jax.random.PRNGKey(0))
    >>> layer.weight.shape, layer(jnp.ones(4)).shape
    ((2, 3, 2), (6,))
    """

    weight: Array
    bias: Array | None
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int,
        use_bias: bool = True,
        dtype: Any = None,
        *,
        key: Array,
    ):
        if groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(
                f"braintrace_eqx.ETPGroupedLinear({in_features}, {out_features}, "
                f"groups={groups}): in_features and out_features must be multiples of groups "
                "(>= 1); change groups or the sizes."
            )
        wkey, bkey = jax.random.split(key)
        dtype, fan_in = _dtype(dtype), in_features // groups
        shape = (groups, out_features // groups, fan_in)
        self.weight = _uniform(wkey, shape, fan_in, dtype)
        self.bias = _uniform(bkey, (out_features,), fan_in, dtype) if use_bias else None
        self.in_features, self.out_features = in_features, out_features
        self.groups, self.use_bias = groups, use_bias

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """``block_diagonal(weight) @ x + bias`` for one sample ``(in_features,)``
        (``(batch, in_features)`` is accepted too); ``key`` is ignored."""
        del key
        where = f"braintrace_eqx.ETPGroupedLinear({self.in_features}, {self.out_features})"
        check_input(where, "x", x, self.in_features)
        x, dtype = promote(x, self.weight)
        return ops.grouped_dense(x, self.weight, self.bias, weight_layout="out_in", dtype=dtype)


class ETPSparseLinear(eqx.Module):
    """A linear layer with fixed sparse connectivity whose non-zeros train by traces.

    ``y = W x + bias`` with ``W`` zero except at the static ``(input, output)`` pairs of
    ``indices`` (:func:`braintrace.ops.sparse_dense`; the pairs are ``(in, out)`` in every
    face). Array fields ``values (nnz,)`` and ``bias (out_features,)``; the pattern is a
    static field. D-RTRL's trace lives on the non-zeros (``nnz x S`` per sample).

    Parameters
    ----------
    in_features, out_features : int
        Shape of the dense weight.
    indices : array_like of int
        ``(nnz, 2)`` static ``(input, output)`` pairs.
    use_bias : bool
        Whether to add a bias.
    dtype : dtype, optional
        Parameter dtype (Equinox's default floating dtype if ``None``).
    key : Array
        Initialisation key; values and bias are uniform in ``+-1/sqrt(nnz / out)``, the
        mean number of connections per output taken as the fan-in.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> layer = bte.ETPSparseLinear(4, 3, [[0, 0], [1, 2], [3, 1]], key=jax.random.PRNGKey(0))
    >>> layer.values.shape, layer(jnp.ones(4)).shape
    ((3,), (3,))
    """

    values: Array
    bias: Array | None
    pattern: SparsePattern = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        indices: Any,
        use_bias: bool = True,
        dtype: Any = None,
        *,
        key: Array,
    ):
        where = f"braintrace_eqx.ETPSparseLinear({in_features}, {out_features})"
        pattern = SparsePattern.from_indices(indices, (in_features, out_features), op=where)
        vkey, bkey = jax.random.split(key)
        dtype, fan_in = _dtype(dtype), pattern.mean_fan_in
        self.values = _uniform(vkey, (pattern.nnz,), fan_in, dtype)
        self.bias = _uniform(bkey, (out_features,), fan_in, dtype) if use_bias else None
        self.pattern = pattern
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """``W @ x + bias`` for one sample ``(in_features,)`` (a batch is accepted too)."""
        del key
        where = f"braintrace_eqx.ETPSparseLinear({self.in_features}, {self.out_features})"
        check_input(where, "x", x, self.in_features)
        x, dtype = promote(x, self.values)
        shape = (self.in_features, self.out_features)
        return ops.sparse_dense(x, self.values, self.pattern, shape, self.bias, dtype=dtype)
