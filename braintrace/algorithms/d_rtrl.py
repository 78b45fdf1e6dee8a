"""D-RTRL: a parameter-dimension eligibility trace per relation.

For a relation (op, group) with per-position state Jacobian ``D`` and
``D_f = dh/dy``, one sample's trace is updated as

    eps^t[a] = sum_c yw_to_w(D^t[..., a, c], eps^{t-1}[c]) + xy_to_trace(x^t, D_f^t[..., a])

and contracted with the learning signal ``g = dl/dh^{t-1}`` as
``trace_to_dw(sum_a yw_to_w(g[..., a], eps[a]))``. For a dense op that is
DESIGN.md section 3's ``eps[i,k,a] = sum_c D[k,a,c] eps[i,k,c] + x[i] D_f[k,a]``.
Memory O(|W| S) per sample.

Storage: the rules speak of traces with a trailing state axis; the learner keeps
one trace per state, a tuple of ``S`` arrays shaped ``(*lead, *weight_shape)``. Each
is contiguous, so every update and contraction is one plain fused loop (a trailing
state axis made XLA emit strided copies: 23.7 against 6.1 ms per step for the
n=256, B=32 RNN of ``benchmarks/bench.py`` on CPU).
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
    weight_structs,
    with_lead,
    x_axis,
)

__all__ = ["D_RTRL"]

_tree_map = jax.tree_util.tree_map
#: Largest batch contracted by an unrolled sum of per-sample blocks.
_UNROLL = 64


def _per_sample(fn, relation: Relation, in_axes):
    """``fn`` mapped over the relation's leading (batch) axis, if it has one."""
    return jax.vmap(fn, in_axes=in_axes) if relation.lead else fn


def _add(u, v):
    return _tree_map(lambda a, b: a + b.astype(a.dtype), u, v)


def init_relation(graph: ETPGraph, relation: Relation, param_leaves: list,
                  dtype=None) -> tuple:
    """Zero D-RTRL trace of one relation: one ``(*lead, *trace_shape)`` tree per state.

    ``dtype`` overrides the storage dtype the op's ``init_drtrl`` rule chose.
    """
    op = graph.ops[relation.op]
    x_var, y_var = op.sample_vars()
    w_var = weight_structs(graph, relation.op, param_leaves)
    num_states = graph.groups[relation.group].num_states
    trace = with_lead(graph, relation, op.rules.init_drtrl(x_var, y_var, w_var, num_states))
    if dtype is not None:
        trace = _tree_map(lambda t: t.astype(dtype), trace)
    return tuple(_tree_map(lambda t, a=a: t[..., a], trace) for a in range(num_states))


def _contract(rules, relation: Relation, signal, trace):
    """``sum_b yw_to_w(signal[b], trace[b])`` for one state (``b`` the leading axis)."""
    if not relation.lead:
        return rules.yw_to_w(signal, trace)
    if signal.shape[0] <= _UNROLL:
        # One fused pass over the trace: each sample's block is scaled and added,
        # instead of materialising every product before a (slow on CPU) reduction.
        terms = (rules.yw_to_w(signal[b], _tree_map(lambda t, b=b: t[b], trace))
                 for b in range(signal.shape[0]))
        return functools.reduce(_add, terms)
    return sum_lead(jax.vmap(rules.yw_to_w)(signal, trace), relation)


def credit_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, signal, grads):
    """Add ``<signal, trace>`` for one relation into ``grads`` (by params leaf)."""
    op = graph.ops[relation.op]
    dtrace = functools.reduce(
        _add, (_contract(op.rules, relation, signal[..., a], t) for a, t in enumerate(trace))
    )
    w = op_weights(graph, relation.op, param_leaves)
    add_into(grads, op.trainables, op.rules.trace_to_dw(dtrace, w))


def update_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, parts) -> tuple:
    """One step of the D-RTRL recursion for one relation."""
    op = graph.ops[relation.op]
    w = op_weights(graph, relation.op, param_leaves)
    x = parts.xs[relation.op]
    scale = _per_sample(op.rules.yw_to_w, relation, (0, 0))
    fresh = _per_sample(lambda x_, df_: op.rules.xy_to_trace(x_, df_, w), relation,
                        (x_axis(graph, relation, x), 0))
    d, df = parts.d[relation.group], parts.df[relation.index]
    num_states = len(trace)

    def new_state(a):
        # Accumulate in the factors' precision; store in the trace's dtype.
        total = functools.reduce(
            _add,
            (scale(d[..., a, c], trace[c]) for c in range(num_states)),
            fresh(x, df[..., a]),
        )
        return _tree_map(lambda new, old: new.astype(old.dtype), total, trace[a])

    # States are few (1-3), so the recursion is unrolled over them.
    return tuple(new_state(a) for a in range(num_states))


class D_RTRL(OnlineAlgorithm):
    """Diagonal real-time recurrent learning (parameter-dimension traces).

    Exact (equal to BPTT) when the hidden groups are driven by external input only
    and the ``y -> h`` maps are position-preserving; otherwise it drops the
    off-diagonal recurrent Jacobian (the "diagonal" approximation).

    Parameters
    ----------
    trace_dtype : dtype, optional
        Storage dtype of the traces (default: each op's rule decides, normally the
        weight's dtype). ``jnp.bfloat16`` halves the trace memory and bandwidth; the
        recursion still accumulates in the factors' precision each step, but the
        stored traces keep only ~3 significant digits, so gradients are approximate.
        Meant for accelerators with native bfloat16: on a CPU the conversions cost
        more than the bandwidth saved (``benchmarks/bench.py`` sizes: 2.7 against
        3.2 ms per step for the RNN).

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace as bt
    >>> algo = bt.D_RTRL()
    >>> compact = bt.D_RTRL(trace_dtype=jnp.bfloat16)
    """

    name = "d_rtrl"

    def __init__(self, *, trace_dtype=None):
        self.trace_dtype = None if trace_dtype is None else jnp.dtype(trace_dtype)
        if self.trace_dtype is not None and not jnp.issubdtype(self.trace_dtype, jnp.floating):
            raise TypeError(f"D_RTRL: trace_dtype must be a floating dtype, got {trace_dtype}.")

    def __repr__(self) -> str:
        if self.trace_dtype is None:
            return "D_RTRL()"
        return f"D_RTRL(trace_dtype={self.trace_dtype.name})"

    def init_traces(self, graph, param_leaves):
        return tuple(
            init_relation(graph, r, param_leaves, self.trace_dtype) for r in graph.relations
        )

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
