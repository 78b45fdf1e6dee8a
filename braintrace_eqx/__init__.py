"""braintrace for Equinox: ETP layers and cells as ``eqx.Module`` s, and the learner.

Layers (:class:`Linear`, :class:`LoRA`, :class:`Elemwise`) and cells
(:class:`GRUCell`, :class:`LSTMCell`, :class:`LIFCell`) route their trainable
arrays through braintrace's ETP ops; :func:`compile` turns a per-sample model
``model(x, hidden) -> (hidden, out)`` into an online learner whose gradients are
model-shaped pytrees for ``optax`` and ``eqx.apply_updates``.

Examples
--------
>>> import jax, jax.numpy as jnp, braintrace_eqx as bte
>>> bte.Linear(3, 2, key=jax.random.PRNGKey(0))(jnp.ones(3)).shape
(2,)
"""

from braintrace.surrogate import spike

from .cells import GRUCell, LIFCell, LSTMCell
from .convert import from_eqx, to_eqx
from .filters import trainable
from .layers import Elemwise, Linear, LoRA
from .learner import Learner, compile

__all__ = [
    "Linear",
    "LoRA",
    "Elemwise",
    "GRUCell",
    "LSTMCell",
    "LIFCell",
    "spike",
    "from_eqx",
    "to_eqx",
    "trainable",
    "compile",
    "Learner",
]
