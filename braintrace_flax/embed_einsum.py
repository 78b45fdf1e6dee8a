"""Linen twins of ``nn.Embed``, ``nn.Einsum`` and ``nn.DenseGeneral`` backed by ETP ops.

:class:`ETPEmbed` runs its lookup through :func:`braintrace.ops.embed` (and ``attend``
through the dense op on the same table); :class:`ETPEinsum` and
:class:`ETPDenseGeneral` run through :func:`braintrace.ops.einsum`. Each creates the
stock layer's parameters (names, shapes, initialisers, RNG order, auto-name) and
returns the stock layer's output; the ``*_forward`` functions are what
``convert_dense=True`` runs for a stock layer (:mod:`braintrace_flax.convert`).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax.linen import module as flax_module

from braintrace import ops

from .layers import _check_dot_general, _compute_dtype, autoname_like, where

__all__ = [
    "ETPEmbed",
    "ETPEinsum",
    "ETPDenseGeneral",
    "embed_forward",
    "attend_forward",
    "einsum_forward",
    "dense_general_forward",
]

Array = jax.Array


# -- Embed --------------------------------------------------------------------------------


def embed_forward(module: nn.Embed, inputs: Array) -> Array:
    """``nn.Embed.__call__`` through :func:`braintrace.ops.embed` (same output).

    Every axis of ``inputs`` is kept; the first is the batch axis of a Flax-style step.
    """
    ids = jnp.asarray(inputs)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"{where(module)}: inputs must be integer ids (rows of the embedding table), got "
            f"dtype {ids.dtype}; cast them with inputs.astype(jnp.int32)."
        )
    table = module.embedding
    (promoted,) = jax.eval_shape(
        lambda e: module.promote_dtype(e, dtype=module.dtype, inexact=False), table
    )
    if module.num_embeddings == 1:  # the stock layer broadcasts its one row
        ids = jnp.zeros_like(ids)
    try:
        return ops.embed(ids, table, dtype=promoted.dtype)
    except (TypeError, ValueError, IndexError) as err:
        raise type(err)(f"{where(module)}: {err}") from err


def attend_forward(module: nn.Embed, query: Array) -> Array:
    """``nn.Embed.attend`` (``query @ embedding.T``) through the dense ETP op on the table."""
    table = module.embedding
    promoted = jax.eval_shape(
        lambda q, e: module.promote_dtype(q, e, dtype=module.dtype), query, table
    )
    dtype = promoted[0].dtype
    x = jnp.asarray(query, dtype)
    if x.ndim == 0 or x.shape[-1] != module.features:
        raise ValueError(
            f"{where(module)}: attend's query must be (..., {module.features}), got shape "
            f"{tuple(x.shape)}."
        )
    lead = x.shape[:-1]
    flat = x.reshape((math.prod(lead), x.shape[-1])) if x.ndim != 2 else x
    y = ops.dense(flat, table, weight_layout="out_in", dtype=dtype)
    return y.reshape(lead + (module.num_embeddings,))


class ETPEmbed(nn.Embed):
    """Drop-in for ``flax.linen.Embed`` whose table trains by eligibility traces.

    Same fields, parameter (``embedding (num_embeddings, features)``), initialiser,
    auto-name (``Embed_<n>``) and outputs, for ``__call__`` and ``attend``. Integer ids
    of any shape (the first axis is the batch axis in a Flax-style step). Trace
    memory per sample: ``docs/algorithms.md``, "Embedding".

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import ETPEmbed
    >>> ids = jnp.array([[1, 2], [0, 1]])
    >>> v = ETPEmbed(4, 3).init(jax.random.key(0), ids)
    >>> ref = nn.Embed(4, 3).init(jax.random.key(0), ids)
    >>> bool((v['params']['embedding'] == ref['params']['embedding']).all())
    True
    >>> ETPEmbed(4, 3).apply(v, ids).shape
    (2, 2, 3)
    """

    def __post_init__(self) -> None:
        autoname_like(self, "Embed")
        super().__post_init__()

    def __call__(self, inputs: Array) -> Array:
        """Look the ids up in the table through the ETP embedding op."""
        return embed_forward(self, inputs)

    def attend(self, query: Array) -> Array:
        """``query @ embedding.T`` through the ETP dense op (``weight_layout='out_in'``)."""
        return attend_forward(self, query)


# -- Einsum ---------------------------------------------------------------------------------


def _explicit_spec(who: str, einsum_str: str, inputs: Array, kernel: Array) -> str:
    """``einsum_str`` with any ellipsis written out (as ``nn.Einsum`` reads it)."""
    if "->" not in einsum_str:
        raise ValueError(f"{who}: einsum_str must be explicit and include '->'.")
    if einsum_str.count(",") != 1:
        raise ValueError(
            f"{who}: einsum_str must have exactly two operands (the input and the kernel), "
            f"got {einsum_str.count(',') + 1}; a second weight operand cannot be traced."
        )
    lhs, out, _ = opt_einsum.parser.parse_einsum_input((einsum_str, inputs, kernel))
    return f"{lhs}->{out}"


def einsum_forward(module: nn.Einsum, inputs: Array, einsum_str: str | None = None) -> Array:
    """``nn.Einsum.__call__`` through :func:`braintrace.ops.einsum` (same params, output)."""
    einsum_str = flax_module.merge_param("einsum_str", module.einsum_str, einsum_str)
    einsum_str = einsum_str.replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
        _explicit_spec(where(module), einsum_str, inputs, None)
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = None
    if module.use_bias:
        bias_shape, _ = module._get_bias_shape(einsum_str, inputs, kernel)
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    dtype = _compute_dtype(module, inputs, kernel, bias)
    x = jnp.asarray(inputs, dtype)
    spec = _explicit_spec(where(module), einsum_str, x, kernel)
    try:
        return ops.einsum(
            spec,
            x,
            kernel,
            bias,
            dtype=dtype,
            precision=module.precision,
            preferred_element_type=module.preferred_element_type,
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where(module)}: {err}") from err


class ETPEinsum(nn.Einsum):
    """Drop-in for ``flax.linen.Einsum`` whose kernel and bias train by eligibility traces.

    Same fields, parameters (``kernel`` of ``shape``, ``bias`` on the output axes the
    kernel has), initialisers, auto-name (``Einsum_<n>``) and output. The equation
    has the input first and the kernel second; with a leading batch axis (first in the
    input and the output, not in the kernel) the op is batched. Trace memory:
    ``docs/algorithms.md``, "Einsum".

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPEinsum
    >>> layer = ETPEinsum((3, 2, 4), 'bli,iho->blho')
    >>> v = layer.init(jax.random.key(0), jnp.ones((2, 5, 3)))
    >>> jax.tree_util.tree_map(jnp.shape, v['params'])
    {'bias': (2, 4), 'kernel': (3, 2, 4)}
    """

    def __post_init__(self) -> None:
        autoname_like(self, "Einsum")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array, einsum_str: str | None = None) -> Array:
        """Apply the einsum (and bias) through the ETP einsum op."""
        return einsum_forward(self, inputs, einsum_str)


# -- DenseGeneral ---------------------------------------------------------------------------


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,)


def _dense_general_axes(module, ndim: int) -> tuple[tuple, tuple]:
    """``(axis, batch_dims)`` normalised to non-negative ints, checked as the stock layer."""
    axis = tuple(sorted(a % ndim for a in _as_tuple(module.axis)))  # sorted, as stock
    batch_dims = tuple(sorted(b % ndim for b in _as_tuple(module.batch_dims)))
    if batch_dims and set(batch_dims) != set(range(max(batch_dims) + 1)):
        raise ValueError(
            f"{where(module)}: batch_dims {module.batch_dims} must be consecutive leading "
            "dimensions starting from 0."
        )
    if len(set(axis)) != len(axis) or set(axis) & set(batch_dims):
        raise ValueError(
            f"{where(module)}: axis {module.axis} must not repeat or overlap batch_dims."
        )
    return axis, batch_dims


def _reshaped_init(init, flat_of):
    """An initialiser that draws ``flat_of(shape)`` and reshapes it to ``shape``.

    ``nn.DenseGeneral`` initialises its kernel as a matrix (fan-in = the contracted
    and batch axes) and its bias as a vector, then reshapes; so does this.
    """

    def wrapped(rng, shape, dtype=jnp.float32):
        value = init(rng, flat_of(tuple(shape)), dtype)
        if isinstance(value, nn.meta.AxisMetadata):
            return nn.meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return wrapped


def _dense_general_spec(ndim: int, axis: tuple, batch_dims: tuple, n_features: int) -> str:
    letters = iter(string.ascii_letters)
    x = [next(letters) for _ in range(ndim)]
    feats = "".join(next(letters) for _ in range(n_features))
    batch = "".join(x[b] for b in batch_dims)
    kernel = batch + "".join(x[a] for a in axis) + feats
    free = "".join(x[i] for i in range(ndim) if i not in axis and i not in batch_dims)
    return f"{''.join(x)},{kernel}->{batch}{free}{feats}"


def dense_general_forward(module: nn.DenseGeneral, inputs: Array) -> Array:
    """``nn.DenseGeneral.__call__`` through :func:`braintrace.ops.einsum` (same params)."""
    _check_dot_general(module)
    inputs = jnp.asarray(inputs)
    features = _as_tuple(module.features)
    axis, batch_dims = _dense_general_axes(module, inputs.ndim)
    batch_shape = tuple(inputs.shape[b] for b in batch_dims)
    kernel_shape = batch_shape + tuple(inputs.shape[a] for a in axis) + features
    n_b, n_f = len(batch_dims), len(features)
    n_in = n_b + len(axis)
    kernel_init = _reshaped_init(
        module.kernel_init,
        lambda s: (int(np.prod(s[:n_in])), int(np.prod(s[len(s) - n_f :]))),
    )
    kernel = module.param("kernel", kernel_init, kernel_shape, module.param_dtype)
    bias = None
    if module.use_bias:
        bias_init = _reshaped_init(module.bias_init, lambda s: (int(np.prod(s)),))
        bias = module.param("bias", bias_init, batch_shape + features, module.param_dtype)
    dtype = _compute_dtype(module, inputs, kernel, bias)
    spec = _dense_general_spec(inputs.ndim, axis, batch_dims, n_f)
    x = jnp.asarray(inputs, dtype)
    try:
        return ops.einsum(spec, x, kernel, bias, dtype=dtype, precision=module.precision)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where(module)}: {err}") from err


class ETPDenseGeneral(nn.DenseGeneral):
    """Drop-in for ``flax.linen.DenseGeneral`` whose kernel and bias train by traces.

    Same fields, parameters (``kernel (*batch, *contracted, *features)``, ``bias
    (*batch, *features)``), initialisers, auto-name (``DenseGeneral_<n>``) and output;
    the product runs through :func:`braintrace.ops.einsum`. Axes of the input that are
    neither contracted nor ``batch_dims`` (after the batch axis of a Flax-style step)
    are positions: the D-RTRL trace keeps them (``docs/algorithms.md``, "Einsum").

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import ETPDenseGeneral
    >>> x = jnp.ones((2, 5, 3))
    >>> v = ETPDenseGeneral((2, 4)).init(jax.random.key(0), x)
    >>> ref = nn.DenseGeneral((2, 4)).init(jax.random.key(0), x)
    >>> bool((v['params']['kernel'] == ref['params']['kernel']).all())
    True
    >>> ETPDenseGeneral((2, 4)).apply(v, x).shape
    (2, 5, 2, 4)
    """

    def __post_init__(self) -> None:
        autoname_like(self, "DenseGeneral")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Apply the generalised dense map through the ETP einsum op."""
        return dense_general_forward(self, inputs)
