"""D-RTRL: a parameter-dimension eligibility trace per relation.

For a relation (op, group) with per-position state Jacobian ``D`` and
``D_f = dh/dy``, one sample's trace is updated as

    eps^t[a] = sum_c yw_to_w(D^t[..., a, c], eps^{t-1}[c]) + xy_to_trace(x^t, D_f^t[..., a])

and contracted with the learning signal ``g = dl/dh^{t-1}`` as
``trace_to_dw(sum_a yw_to_w(g[..., a], eps[a]))``. For a dense op that is
DESIGN.md section 3's ``eps[i,k,a] = sum_c D[k,a,c] eps[i,k,c] + x[i] D_f[k,a]``.
Memory O(|W| S) per sample.

Storage: the rules speak of traces with a trailing state axis; the learner keeps
the state axis *first*, ``(S, *lead, *weight_shape)``, so that every state's trace is
one contiguous array and the update is plain fused elementwise work (a trailing
axis of size 1 or 2 made XLA emit strided copies, measured 10x slower).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..compiler.graph import ETPGraph, Relation
from .base import (
    OnlineAlgorithm,
    add_into,
    op_weights,
    sum_lead,
    sum_leading,
    weight_structs,
    with_lead,
    x_axis,
)

__all__ = ["D_RTRL"]

_tree_map = jax.tree_util.tree_map
#: Largest number of (state, sample) blocks contracted by an unrolled sum.
_UNROLL = 128


def _per_sample(fn, relation: Relation, in_axes):
    """``fn`` mapped over the relation's leading (batch) axis, if it has one."""
    return jax.vmap(fn, in_axes=in_axes) if relation.lead else fn


def init_relation(graph: ETPGraph, relation: Relation, param_leaves: list):
    """Zero D-RTRL trace of one relation, stored ``(S, *lead, *trace_shape)``."""
    op = graph.ops[relation.op]
    x_var, y_var = op.sample_vars()
    w_var = weight_structs(graph, relation.op, param_leaves)
    trace = op.rules.init_drtrl(x_var, y_var, w_var, graph.groups[relation.group].num_states)
    trace = with_lead(graph, relation, trace)
    return _tree_map(lambda a: jnp.moveaxis(a, -1, 0), trace)


def _scale(graph, relation):
    """``yw_to_w`` of one state, mapped over the leading axis."""
    rules = graph.ops[relation.op].rules
    return _per_sample(rules.yw_to_w, relation, (0, 0))


def credit_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, signal, grads):
    """Add ``<signal, trace>`` for one relation into ``grads`` (by params leaf)."""
    op = graph.ops[relation.op]
    signal = jnp.moveaxis(signal, -1, 0)  # (S, *lead, *pos), like the trace
    blocks = signal.shape[0] * (signal.shape[1] if relation.lead else 1)
    if blocks <= _UNROLL:
        # One fused pass over the trace: each (state, sample) block is scaled and
        # added in place, instead of materialising every product before a reduction.
        index = [(a, b) for a in range(signal.shape[0])
                 for b in (range(signal.shape[1]) if relation.lead else [None])]
        terms = (
            op.rules.yw_to_w(signal[a] if b is None else signal[a, b],
                             _tree_map(lambda t, a=a, b=b: t[a] if b is None else t[a, b], trace))
            for a, b in index
        )
        dtrace = functools.reduce(lambda u, v: _tree_map(jnp.add, u, v), terms)
    else:
        per_state = jax.vmap(_scale(graph, relation), in_axes=(0, 0))(signal, trace)
        dtrace = sum_lead(_tree_map(sum_leading, per_state), relation)
    w = op_weights(graph, relation.op, param_leaves)
    add_into(grads, op.trainables, op.rules.trace_to_dw(dtrace, w))


def update_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, parts):
    """One step of the D-RTRL recursion for one relation."""
    op = graph.ops[relation.op]
    w = op_weights(graph, relation.op, param_leaves)
    x = parts.xs[relation.op]
    scale = _scale(graph, relation)
    fresh = _per_sample(lambda x_, df_: op.rules.xy_to_trace(x_, df_, w), relation,
                        (x_axis(graph, relation, x), 0))
    d = jnp.moveaxis(parts.d[relation.group], (-2, -1), (0, 1))  # (S_a, S_c, *lead, *pos)
    df = jnp.moveaxis(parts.df[relation.index], -1, 0)  # (S_a, *lead, *pos)

    def one_state(d_a, df_a):
        propagated = jax.vmap(scale, in_axes=(0, 0))(d_a, trace)  # (S_c, ...)
        new = fresh(x, df_a)
        return _tree_map(lambda p, f: sum_leading(p) + f.astype(p.dtype), propagated, new)

    return jax.vmap(one_state)(d, df)


class D_RTRL(OnlineAlgorithm):
    """Diagonal real-time recurrent learning (parameter-dimension traces).

    Exact (equal to BPTT) when the hidden groups are driven by external input only
    and the ``y -> h`` maps are position-preserving; otherwise it drops the
    off-diagonal recurrent Jacobian (the "diagonal" approximation).

    Examples
    --------
    >>> import braintrace as bt
    >>> algo = bt.D_RTRL()
    """

    name = "d_rtrl"

    def init_traces(self, graph, param_leaves):
        return tuple(init_relation(graph, r, param_leaves) for r in graph.relations)

    def credit(self, graph, param_leaves, traces, signals, count):
        grads: dict = {}
        for r, trace in zip(graph.relations, traces):
            credit_relation(graph, r, param_leaves, trace, signals[r.group], grads)
        return grads

    def update(self, graph, param_leaves, traces, parts, count):
        return tuple(
            update_relation(graph, r, param_leaves, trace, parts)
            for r, trace in zip(graph.relations, traces)
        )
