"""braintrace for Equinox: ETP layers and cells as ``eqx.Module`` s, and the learner.

Layers (:class:`ETPLinear`, :class:`ETPLoRA`, :class:`ETPElemwise`,
:class:`ETPEmbedding`) and cells
(:class:`ETPGRUCell`, :class:`ETPLSTMCell`, :class:`ETPLIFCell`, :class:`ETPLRUCell`)
route their trainable arrays through braintrace's ETP ops; the twins of Equinox layers keep
Equinox's fields, and :func:`from_eqx` / :func:`to_eqx` convert a whole model. :func:`compile`
turns a per-sample model ``model(x, hidden) -> (hidden, out)`` into an online learner
whose gradients are model-shaped pytrees for ``optax`` and ``eqx.apply_updates``.

Every braintrace layer and cell carries the ``ETP`` prefix, in each face (linen,
NNX, Equinox). The names without it (``Linear``, ``LoRA``, ``Elemwise``, ``GRUCell``,
``LSTMCell``, ``LIFCell``) were this package's first, documented names; they remain
importable as aliases of the same classes.

Examples
--------
>>> import jax, jax.numpy as jnp, braintrace_eqx as bte
>>> bte.ETPLinear(3, 2, key=jax.random.PRNGKey(0))(jnp.ones(3)).shape
(2,)
"""

from braintrace.surrogate import spike

from .cells import ETPGRUCell, ETPLIFCell, ETPLRUCell, ETPLSTMCell
from .conv import ETPConv, ETPConv1d, ETPConv2d
from .convert import from_eqx, to_eqx
from .embed import ETPEmbedding
from .filters import trainable
from .grouped_sparse import ETPGroupedLinear, ETPSparseLinear
from .layers import ETPElemwise, ETPLinear, ETPLoRA
from .learner import Learner, compile

# The first release's names (documented then), kept as aliases of the same classes.
Linear = ETPLinear
LoRA = ETPLoRA
Elemwise = ETPElemwise
GRUCell = ETPGRUCell
LSTMCell = ETPLSTMCell
LIFCell = ETPLIFCell

__all__ = [
    "ETPLinear",
    "ETPLoRA",
    "ETPElemwise",
    "ETPConv",
    "ETPConv1d",
    "ETPConv2d",
    "ETPEmbedding",
    "ETPGroupedLinear",
    "ETPSparseLinear",
    "ETPGRUCell",
    "ETPLSTMCell",
    "ETPLIFCell",
    "ETPLRUCell",
    "spike",
    "from_eqx",
    "to_eqx",
    "trainable",
    "compile",
    "Learner",
]
