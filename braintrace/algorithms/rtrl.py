"""RTRL: the full influence matrix ``dh/dtheta``, BPTT's gradient forward in time.

Per sample, with ``h`` the flat float hidden state (size ``H``) and ``theta`` every
float ``params`` leaf that reaches it (``docs/algorithms.md``, "RTRL"):

    M^t = J^t M^{t-1} + I^t,        credit = < dL/dh^{t0-1} , M^{t0-1} >

``J^t`` and ``I^t`` come from ``H`` reverse passes through the step
(:func:`~braintrace.algorithms.sample_grads.reverse_rows`), so every path counts:
recurrent weights, input layers, plain ``jnp`` uses. Memory ``O(H P)`` per sample,
time ``O(H^2 P)`` per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp

from ..compiler.errors import CompileError
from ..compiler.report import EXACT, CompileReport
from . import sample_grads
from . import whole_step as ws
from .base import Algorithm

__all__ = ["RTRL", "RTRLTraces"]

_GiB = 1 << 30


class RTRLTraces(NamedTuple):
    """RTRL's state: per influenced ``params`` leaf, ``M`` of shape ``(*lead, H, *leaf.shape)``.

    ``lead`` is the batch axis when the learner is batched; ``H`` is one sample's
    float hidden size, in the flat order of the hidden leaves.
    """

    influence: tuple


def _bytes_per_sample(graph, param_leaves) -> int:
    size = ws.state_size(graph)
    return sum(
        size * param_leaves[i].size * jnp.dtype(jnp.result_type(param_leaves[i])).itemsize
        for i in ws.influenced(graph)
    )


class RTRL(Algorithm):
    """Real-time recurrent learning: the exact gradient, forward in time.

    Keeps, per sample, the influence ``dh/dtheta`` of every float parameter leaf that
    reaches the hidden state (ETP op or plain ``jnp``: input layers, recurrent
    weights and parameters used twice included), so its summed gradient is BPTT's
    for every model the compiler accepts, with memory independent of ``T``. The
    price is memory ``O(H P)`` and time ``O(H^2 P)`` per sample and step: use it
    on small models, as the reference the approximations are measured against.

    Parameters
    ----------
    max_bytes : int
        The largest influence matrix (all samples) a learner may keep; a bigger
        one is refused when the learner is compiled, with its size (default 1 GiB).

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace as bt
    >>> from braintrace.testing import models
    >>> learner = bt.compile(models.rnn_step, models.mse, bt.RTRL(), batched=False)
    >>> params = models.rnn_params()
    >>> state = learner.init(params, jnp.zeros(models.N), jnp.zeros(models.N_IN))
    >>> state.traces.influence[0].shape  # (H, *b.shape): b is the first leaf
    (4, 4)
    """

    name = "rtrl"
    traced = True

    def __init__(self, max_bytes: int = _GiB):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"RTRL: max_bytes must be a positive int, got {max_bytes!r}.")
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"RTRL(max_bytes={self.max_bytes})"

    def validate(self, graph, param_leaves) -> None:
        batch = math.prod(graph.batch_lead)
        total = batch * _bytes_per_sample(graph, param_leaves)
        if total > self.max_bytes:
            raise CompileError(
                f"RTRL: the influence matrix would take {total / _GiB:.2f} GiB ({total} bytes: "
                f"H={ws.state_size(graph)} hidden elements x the parameters, for {batch} "
                f"sample(s)), over max_bytes={self.max_bytes}. Use bt.D_RTRL() or bt.SnAp1() "
                "(parameter-sized traces), a smaller model or batch, or raise max_bytes."
            )

    def describe(self, report: CompileReport, graph) -> CompileReport:
        reason = "RTRL: the full influence dh/dtheta, every path (= BPTT)"
        return ws.described(report, EXACT, reason)

    def init_traces(self, graph, param_leaves, key=None) -> RTRLTraces:
        lead = graph.batch_lead + (ws.state_size(graph),)
        leaves = [param_leaves[i] for i in ws.influenced(graph)]
        return RTRLTraces(tuple(jnp.zeros(lead + jnp.shape(a), jnp.result_type(a)) for a in leaves))

    def forward(self, graph, params, hidden, x):
        return ws.record_inputs(graph, params, hidden, x)

    def credit(self, graph, param_leaves, traces, signals, count) -> dict:
        lead = 1 if graph.batched else 0
        g = ws.flat_state(graph, list(signals.leaves), lead)
        spec = "bh,bh...->..." if lead else "h,h...->..."
        return {
            leaf: jnp.einsum(spec, g.astype(m.dtype), m)
            for leaf, m in zip(ws.influenced(graph), traces.influence)
        }

    def update(self, graph, param_leaves, traces, parts, count) -> RTRLTraces:
        size = ws.state_size(graph)
        eye = jnp.eye(size, dtype=ws.state_dtype(graph))
        if graph.batched:
            eye = jnp.broadcast_to(eye[:, None, :], (size, *graph.batch_lead, size))
        rows = sample_grads.reverse_rows(graph, param_leaves, parts, eye)  # I and J, by row
        spec = "bkh,bh...->bk..." if graph.batched else "kh,h...->k..."
        return RTRLTraces(
            tuple(
                jnp.einsum(spec, rows.state.astype(m.dtype), m) + i.astype(m.dtype)
                for m, i in zip(traces.influence, rows.params)
            )
        )
