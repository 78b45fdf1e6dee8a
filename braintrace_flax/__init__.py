"""braintrace for Flax: ETP layers, online cells and the learner glue, for linen and NNX.

Linen (this module):

- :class:`ETPDense`, :class:`ETPLoRA`, :class:`ETPElemwise`: linen layers whose
  parameters train by eligibility traces (``ETPDense`` is a drop-in for ``nn.Dense``).
- :class:`ETPEmbed`, :class:`ETPEinsum`, :class:`ETPDenseGeneral`: drop-ins for
  ``nn.Embed``, ``nn.Einsum`` and ``nn.DenseGeneral`` (embedding and einsum ops).
- :class:`ETPLIFCell`, :class:`ETPGRUCell`, :class:`ETPLSTMCell`, :class:`ETPLRUCell`: ready
  recurrent cells.
- :func:`compile`: a linen module (or an ``nn.RNN``) and a loss to ``braintrace``'s
  online learner; ``convert_dense=True`` runs stock ``nn.Dense`` layers through ETP ops.

NNX: ``from braintrace_flax import nnx as btnnx`` (:mod:`braintrace_flax.nnx`).

Every braintrace layer and cell carries the ``ETP`` prefix, in each face; ``LIFCell``,
this package's first (documented) name for :class:`ETPLIFCell`, remains an alias.

Examples
--------
>>> import jax, jax.numpy as jnp, braintrace as bt, braintrace_flax as btf
>>> cell = btf.ETPLIFCell(4)
>>> x = jnp.ones((2, 3), jnp.float32)
>>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
>>> params = cell.init(jax.random.key(1), carry, x)['params']
>>> learner = btf.compile(cell, lambda s, y: jnp.sum((s - y) ** 2), bt.D_RTRL())
>>> learner.report(params, carry, x).param("['decay']['weight']").mode
'trace'
"""

from ._sequence import SequenceLearner
from .cells import (
    ETPGRUCell,
    ETPLIFCell,
    ETPLRUCell,
    ETPLSTMCell,
    ExpDecay,
    LIFCell,
    gru_forward,
    lstm_forward,
    spike,
)
from .conv import ETPConv, conv_forward
from .convert import dense_interceptor, etp_dense_calls
from .embed_einsum import (
    ETPDenseGeneral,
    ETPEinsum,
    ETPEmbed,
    attend_forward,
    dense_general_forward,
    einsum_forward,
    embed_forward,
)
from .grouped_sparse import ETPGroupedDense, ETPSparseDense
from .layers import FROZEN, ETPDense, ETPElemwise, ETPLoRA, dense_forward
from .learner import compile, make_step

__all__ = [
    "ETPDense",
    "ETPLoRA",
    "ETPElemwise",
    "ETPGroupedDense",
    "ETPSparseDense",
    "FROZEN",
    "dense_forward",
    "ETPConv",
    "conv_forward",
    "ETPEmbed",
    "ETPEinsum",
    "ETPDenseGeneral",
    "embed_forward",
    "attend_forward",
    "einsum_forward",
    "dense_general_forward",
    "ETPLIFCell",
    "LIFCell",
    "ETPGRUCell",
    "ETPLSTMCell",
    "ETPLRUCell",
    "ExpDecay",
    "spike",
    "gru_forward",
    "lstm_forward",
    "etp_dense_calls",
    "dense_interceptor",
    "compile",
    "make_step",
    "SequenceLearner",
]
