"""NNX twins of ``nnx.Embed`` and ``nnx.Einsum`` backed by ETP ops.

:class:`ETPEmbed` and :class:`ETPEinsum` subclass the stock layers and change only
``__call__`` (and ``attend``), so the constructor, the ``Param`` s and
``nnx.state`` are the stock layer's and :func:`braintrace_flax.nnx.convert` swaps
a stock layer in place by changing its class.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import opt_einsum
from flax import nnx

from braintrace import ops

from ..embed_einsum import _dense_general_spec
from .layers import _compute_dtype

__all__ = ["ETPEmbed", "ETPEinsum", "ETPLinearGeneral"]

Array = jax.Array


def _no_sharding(name: str, out_sharding: Any) -> None:
    if out_sharding is not None:
        raise ValueError(
            f"{name}: out_sharding cannot be honoured by the ETP op; shard the output after "
            "the layer."
        )


class ETPEmbed(nnx.Embed):
    """Drop-in for ``flax.nnx.Embed`` whose table trains by eligibility traces.

    Same constructor, ``embedding`` ``Param`` and outputs (``__call__`` and
    ``attend``); the lookup runs through :func:`braintrace.ops.embed` and ``attend``
    through the dense op on the same table. Trace memory: ``docs/algorithms.md``,
    "Embedding".

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPEmbed(5, 3, rngs=nnx.Rngs(0))
    >>> ref = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[1, 4], [0, 1]])
    >>> bool((layer(ids) == ref(ids)).all())
    True
    """

    def _where(self) -> str:
        return f"ETPEmbed({self.num_embeddings}, {self.features})"

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Look the integer ids up through the ETP embedding op."""
        _no_sharding(self._where(), out_sharding)
        ids = jnp.asarray(inputs)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(
                f"{self._where()}: inputs must be integer ids (rows of the table), got dtype "
                f"{ids.dtype}; cast them with inputs.astype(jnp.int32)."
            )
        table = self.embedding[...]
        (promoted,) = jax.eval_shape(
            lambda e: self.promote_dtype((e,), dtype=self.dtype, inexact=False), table
        )
        if self.num_embeddings == 1:  # the stock layer broadcasts its one row
            ids = jnp.zeros_like(ids)
        try:
            return ops.embed(ids, table, dtype=promoted.dtype)
        except (TypeError, ValueError, IndexError) as err:
            raise type(err)(f"{self._where()}: {err}") from err

    def attend(self, query: Array, out_sharding: Any = None) -> Array:
        """``query @ embedding.T`` through the ETP dense op (``weight_layout='out_in'``)."""
        _no_sharding(self._where(), out_sharding)
        table = self.embedding[...]
        dtype = _compute_dtype(self, query, table)
        x = jnp.asarray(query, dtype)
        if x.ndim == 0 or x.shape[-1] != self.features:
            raise ValueError(
                f"{self._where()}: attend's query must be (..., {self.features}), got shape "
                f"{tuple(x.shape)}."
            )
        lead = x.shape[:-1]
        flat = x.reshape((-1, x.shape[-1])) if x.ndim != 2 else x
        y = ops.dense(flat, table, weight_layout="out_in", dtype=dtype)
        return y.reshape(lead + (self.num_embeddings,))


class ETPEinsum(nnx.Einsum):
    """Drop-in for ``flax.nnx.Einsum`` whose kernel and bias train by eligibility traces.

    Same constructor, ``Param`` s and output; the product runs through
    :func:`braintrace.ops.einsum` (input first, kernel second; a leading batch axis,
    first in the input and the output and not in the kernel, makes the op batched).
    Trace memory: ``docs/algorithms.md``, "Einsum".

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPEinsum('bli,iho->blho', (3, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    >>> ref = nnx.Einsum('bli,iho->blho', (3, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 5, 3))
    >>> bool((layer(x) == ref(x)).all())
    True
    """

    def __call__(
        self, inputs: Array, einsum_str: str | None = None, out_sharding: Any = None
    ) -> Array:
        """Apply the einsum (and bias) through the ETP einsum op."""
        name = f"ETPEinsum({self.einsum_str!r}, {tuple(self.kernel_shape)})"
        _no_sharding(name, out_sharding)
        if self.einsum_op is not jnp.einsum:
            raise ValueError(
                f"{name}: a custom einsum_op cannot be honoured by the ETP einsum op; leave "
                "it at its default (jnp.einsum)."
            )
        einsum_str = einsum_str if einsum_str is not None else self.einsum_str
        if einsum_str is None:
            raise ValueError(f"{name}: no einsum_str was given, to the layer or the call.")
        einsum_str = einsum_str.replace(" ", "")
        self._einsum_str_check(einsum_str)
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        dtype = _compute_dtype(self, inputs, kernel, bias)
        x = jnp.asarray(inputs, dtype)
        lhs, out, _ = opt_einsum.parser.parse_einsum_input((einsum_str, x, kernel))
        try:
            return ops.einsum(
                f"{lhs}->{out}",
                x,
                kernel,
                bias,
                dtype=dtype,
                precision=self.precision,
                preferred_element_type=self.preferred_element_type,
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from err


class ETPLinearGeneral(nnx.LinearGeneral):
    """Drop-in for ``flax.nnx.LinearGeneral`` whose kernel and bias train by traces.

    Same constructor, ``Param`` s and output; the product runs through
    :func:`braintrace.ops.einsum` (the einsum that ``nn.DenseGeneral`` lowers to,
    ``docs/algorithms.md``, "Einsum").

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPLinearGeneral(3, (2, 4), rngs=nnx.Rngs(0))
    >>> ref = nnx.LinearGeneral(3, (2, 4), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((5, 3))
    >>> bool((layer(x) == ref(x)).all())
    True
    """

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """Apply the generalised linear map through the ETP einsum op."""
        name = f"ETPLinearGeneral({self.in_features}, {self.out_features})"
        _no_sharding(name, out_sharding)
        if self.dot_general is not None or self.dot_general_cls is not None:
            raise ValueError(
                f"{name}: dot_general / dot_general_cls cannot be honoured by the ETP einsum "
                "op (it computes the product itself); leave them None."
            )
        x = jnp.asarray(inputs)
        axis = tuple(sorted(a % x.ndim for a in self.axis))
        batch = tuple(sorted(b % x.ndim for b in self.batch_axis))
        spec = _dense_general_spec(x.ndim, axis, batch, len(self.out_features))
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        dtype = _compute_dtype(self, x, kernel, bias)
        try:
            return ops.einsum(
                spec,
                jnp.asarray(x, dtype),
                kernel,
                bias,
                dtype=dtype,
                precision=self.precision,
                preferred_element_type=self.preferred_element_type,
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err}") from err
