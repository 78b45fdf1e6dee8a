"""Equinox twin of ``eqx.nn.Embedding`` backed by the ETP embedding op."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jax import Array

from braintrace import ops

__all__ = ["ETPEmbedding"]


class ETPEmbedding(eqx.Module):
    """Drop-in for :class:`equinox.nn.Embedding` whose table trains by eligibility traces.

    Same fields (``weight`` ``(num_embeddings, embedding_size)``, static
    ``num_embeddings`` and ``embedding_size``), same constructor, same initial table
    for the same key and the same output for an in-range id; the lookup runs through
    :func:`braintrace.ops.embed` (one sample: a scalar id; ``jax.vmap`` over a batch
    keeps the op visible). Trace memory: ``docs/algorithms.md``, "Embedding".

    An out-of-range id: Equinox's ``weight[x]`` clamps it under ``jit``, while the op
    returns a NaN row (``jnp.take``'s ``"fill"`` mode) and gives the table no gradient
    from it; an eager call with a concrete id raises ``IndexError``.

    Parameters
    ----------
    num_embeddings, embedding_size : int, optional
        Table size (with ``key``), as Equinox's.
    weight : Array, optional
        The table itself, ``(num_embeddings, embedding_size)``.
    dtype : dtype, optional
        Table dtype when it is drawn (Equinox's default floating dtype if ``None``).
    key : Array, optional
        Initialisation key (keyword only).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> emb, ref = bte.ETPEmbedding(5, 3, key=key), eqx.nn.Embedding(5, 3, key=key)
    >>> bool((emb(jnp.array(2)) == ref(jnp.array(2))).all())
    True
    >>> jax.vmap(emb)(jnp.array([0, 4, 4])).shape
    (3, 3)
    """

    num_embeddings: int = eqx.field(static=True)
    embedding_size: int = eqx.field(static=True)
    weight: Array

    def __init__(
        self,
        num_embeddings: int | None = None,
        embedding_size: int | None = None,
        weight: Array | None = None,
        dtype=None,
        *,
        key: Array | None = None,
    ):
        ref = eqx.nn.Embedding(num_embeddings, embedding_size, weight, dtype, key=key)
        self.num_embeddings = ref.num_embeddings
        self.embedding_size = ref.embedding_size
        self.weight = ref.weight

    def _where(self) -> str:
        return f"braintrace_eqx.ETPEmbedding({self.num_embeddings}, {self.embedding_size})"

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """The row of id ``x`` (a scalar integer), through the ETP embedding op.

        Parameters
        ----------
        x : Array
            A scalar integer id.
        key : Array, optional
            Ignored (Equinox compatibility).

        Returns
        -------
        Array
            ``(embedding_size,)``.
        """
        del key
        ids = jnp.asarray(x)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(
                f"{self._where()}: x must be an integer id, got dtype {ids.dtype}; cast it "
                "with x.astype(jnp.int32)."
            )
        if ids.shape != ():
            raise ValueError(
                f"{self._where()}: x must be a scalar id, got shape {ids.shape}; use jax.vmap "
                "over a batch of ids (it keeps the ETP op)."
            )
        try:
            return ops.embed(ids, self.weight, batched=False)
        except (TypeError, ValueError, IndexError) as err:
            raise type(err)(f"{self._where()}: {err}") from err

    @classmethod
    def from_eqx(cls, embedding: eqx.nn.Embedding) -> ETPEmbedding:
        """The ETP twin of an :class:`equinox.nn.Embedding` (the same table array)."""
        if not isinstance(embedding, eqx.nn.Embedding):
            raise TypeError(
                "braintrace_eqx.ETPEmbedding.from_eqx expects an equinox.nn.Embedding, got "
                f"{type(embedding).__name__}."
            )
        return cls(weight=embedding.weight)

    def to_eqx(self) -> eqx.nn.Embedding:
        """The plain :class:`equinox.nn.Embedding` with the same table array."""
        return eqx.nn.Embedding(weight=self.weight)
