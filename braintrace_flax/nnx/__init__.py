"""braintrace for Flax NNX: ETP layers, in-place conversion of stock layers, and the learner.

- :class:`ETPLinear`, :class:`ETPLoRA`: twins of ``nnx.Linear`` / ``nnx.LoRA`` (same
  constructor, ``Param`` s and outputs) whose parameters train by eligibility traces;
  :class:`ETPElemwise`: a trainable per-neuron parameter. :class:`ETPEmbed`,
  :class:`ETPEinsum`, :class:`ETPLinearGeneral`: twins of ``nnx.Embed``,
  ``nnx.Einsum`` and ``nnx.LinearGeneral`` (embedding and einsum ops).
- :func:`convert`: every stock ``nnx.Linear`` / ``nnx.LoRA`` in a model runs through
  ETP ops, in place, keeping its ``Param`` objects (``nnx.state`` is unchanged).
- :class:`ETPLIFCell`, :class:`ETPGRUCell`, :class:`ETPLSTMCell`,
  :class:`ETPOptimizedLSTMCell`, :class:`ETPLRUCell`: ready cells.
- :func:`compile`: a model ``model(carry, x) -> (carry, out)`` (or an ``nnx.RNN``) and
  a loss to an online learner whose gradients are an ``nnx.State`` for
  ``nnx.Optimizer``.

Examples
--------
>>> import jax.numpy as jnp, braintrace as bt
>>> from flax import nnx
>>> from braintrace_flax import nnx as btnnx
>>> cell = btnnx.ETPLIFCell(3, 4, rngs=nnx.Rngs(0))
>>> x = jnp.ones((2, 3), jnp.float32)
>>> learner = btnnx.compile(cell, lambda s, y: jnp.sum((s - y) ** 2), bt.D_RTRL())
>>> learner.report(cell, cell.initialize_carry(x.shape), x).param("['decay']['weight']").mode
'trace'
"""

from .cells import ETPGRUCell, ETPLIFCell, ETPLRUCell, ETPLSTMCell, ETPOptimizedLSTMCell
from .conv import ETPConv
from .convert import ETP_TWINS, convert
from .embed_einsum import ETPEinsum, ETPEmbed, ETPLinearGeneral
from .grouped_sparse import ETPGroupedLinear, ETPSparseLinear
from .layers import ETPElemwise, ETPLinear, ETPLoRA
from .learner import Learner, compile

__all__ = [
    "ETPLinear",
    "ETPLoRA",
    "ETPElemwise",
    "ETPConv",
    "ETPEmbed",
    "ETPEinsum",
    "ETPLinearGeneral",
    "ETPGroupedLinear",
    "ETPSparseLinear",
    "ETPLIFCell",
    "ETPGRUCell",
    "ETPLSTMCell",
    "ETPOptimizedLSTMCell",
    "ETPLRUCell",
    "convert",
    "ETP_TWINS",
    "compile",
    "Learner",
]
