"""D-RTRL: a parameter-dimension eligibility trace per relation.

For a relation (op, group) with per-position state Jacobian ``D`` and
``D_f = dh/dy``, one sample's trace is updated as

    eps^t[..., a] = sum_c yw_to_w(D^t[..., a, c], eps^{t-1}[..., c])
                    + xy_to_trace(x^t, D_f^t[..., a])

and contracted with the learning signal ``g = dl/dh^{t-1}`` as
``trace_to_dw(sum_a yw_to_w(g[..., a], eps[..., a]))``. For a dense op that is
DESIGN.md section 3's ``eps[i,k,a] = sum_c D[k,a,c] eps[i,k,c] + x[i] D_f[k,a]``.
Memory O(|W| S) per sample.
"""

from __future__ import annotations

import jax

from ..compiler.graph import ETPGraph, Relation
from .base import OnlineAlgorithm, add_into, op_weights, sum_lead, weight_structs, with_lead, x_axis

__all__ = ["D_RTRL"]

_tree_map = jax.tree_util.tree_map


def _scale_states(rules, factor, trace):
    """``sum_c yw_to_w(factor[..., c], trace[..., c])`` (the state axis is last)."""
    per_state = jax.vmap(rules.yw_to_w, in_axes=(-1, -1), out_axes=-1)(factor, trace)
    return _tree_map(lambda a: a.sum(-1), per_state)


def init_relation(graph: ETPGraph, relation: Relation, param_leaves: list):
    """Zero D-RTRL trace of one relation (leading batch axis when the relation has one)."""
    op = graph.ops[relation.op]
    x_var, y_var = op.sample_vars()
    w_var = weight_structs(graph, relation.op, param_leaves)
    trace = op.rules.init_drtrl(x_var, y_var, w_var, graph.groups[relation.group].num_states)
    return with_lead(graph, relation, trace)


def credit_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, signal, grads):
    """Add ``<signal, trace>`` for one relation into ``grads`` (by params leaf)."""
    op = graph.ops[relation.op]
    rules = op.rules
    contract = lambda g, eps: _scale_states(rules, g, eps)  # noqa: E731
    if relation.lead:
        contract = jax.vmap(contract)
    dtrace = sum_lead(contract(signal, trace), relation)
    w = op_weights(graph, relation.op, param_leaves)
    add_into(grads, op.trainables, rules.trace_to_dw(dtrace, w))


def update_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, parts):
    """One step of the D-RTRL recursion for one relation."""
    op = graph.ops[relation.op]
    rules = op.rules
    w = op_weights(graph, relation.op, param_leaves)

    def one_sample(d, df, eps, x):
        propagated = jax.vmap(lambda d_a: _scale_states(rules, d_a, eps), in_axes=-2,
                              out_axes=-1)(d)
        fresh = jax.vmap(lambda df_a: rules.xy_to_trace(x, df_a, w), in_axes=-1,
                         out_axes=-1)(df)
        return _tree_map(lambda p, f: p + f.astype(p.dtype), propagated, fresh)

    x = parts.xs[relation.op]
    if relation.lead:
        one_sample = jax.vmap(one_sample, in_axes=(0, 0, 0, x_axis(graph, relation, x)))
    return one_sample(parts.d[relation.group], parts.df[relation.index], trace, x)


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
