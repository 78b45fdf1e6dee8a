"""braintrace for Flax linen: ETP layers, online cells and the learner glue.

- :class:`ETPDense`, :class:`ETPLoRA`, :class:`ETPElemwise`: linen layers whose
  parameters train by eligibility traces (``ETPDense`` is a drop-in for ``nn.Dense``).
- :class:`LIFCell`, :class:`ETPGRUCell`, :class:`ETPLSTMCell`: ready recurrent cells.
- :func:`compile`: a linen module and a loss to ``braintrace``'s online learner;
  ``convert_dense=True`` runs stock ``nn.Dense`` layers through ETP ops.

Examples
--------
>>> import jax, jax.numpy as jnp, braintrace as bt, braintrace_flax as btf
>>> cell = btf.LIFCell(4)
>>> x = jnp.ones((2, 3), jnp.float32)
>>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
>>> params = cell.init(jax.random.key(1), carry, x)['params']
>>> learner = btf.compile(cell, lambda s, y: jnp.sum((s - y) ** 2), bt.D_RTRL())
>>> learner.report(params, carry, x).param("['tau_mem']['weight']").mode
'trace'
"""

from .cells import ETPGRUCell, ETPLSTMCell, ExpDecay, LIFCell, gru_forward, lstm_forward, spike
from .convert import dense_interceptor, etp_dense_calls
from .layers import FROZEN, ETPDense, ETPElemwise, ETPLoRA, dense_forward
from .learner import compile, make_step

__all__ = [
    "ETPDense",
    "ETPLoRA",
    "ETPElemwise",
    "FROZEN",
    "dense_forward",
    "LIFCell",
    "ETPGRUCell",
    "ETPLSTMCell",
    "ExpDecay",
    "spike",
    "gru_forward",
    "lstm_forward",
    "etp_dense_calls",
    "dense_interceptor",
    "compile",
    "make_step",
]
