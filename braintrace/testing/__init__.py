"""Small models and independent gradient references, shared by tests and benchmarks.

Nothing here is used by the learner itself: :mod:`braintrace.testing.models` holds
tiny step functions (LIF, adaptive LIF, LoRA-driven LIF, tanh RNN, GRU, recurrent
LIF) with their parameter factories, and :mod:`braintrace.testing.reference` the
oracles they are checked against (BPTT by ``jax.grad`` through ``lax.scan``, the
one-step gradient) and the alignment metrics (cosine, sign agreement, norm ratio).

Examples
--------
>>> from braintrace.testing import models, reference
>>> sorted(models.rnn_params(0))
['b', 'ro', 'wh', 'wx']
>>> reference.bptt_grad  # doctest: +ELLIPSIS
<function bptt_grad at ...>
"""

from . import models, reference

__all__ = ["models", "reference"]
