"""D-RTRL for one relation (an op and a hidden group it drives), shared by the algorithms.

For a relation with per-position state Jacobian ``D`` and ``D_f = dh/dy``, one
sample's trace is updated as

    eps^t[a] = sum_c yw_to_w(D^t[..., a, c], eps^{t-1}[c]) + xy_to_trace(x^t, D_f^t[..., a])

and contracted with a learning signal ``g`` as
``trace_to_dw(sum_a yw_to_w(g[..., a], eps[a]))`` (``docs/algorithms.md``, "D-RTRL").
``D_RTRL`` uses it for every relation; ``pp_prop`` for ops without an input, whose
exact trace is already output-sized.

Storage: the rules speak of traces with a trailing state axis; here a relation's
trace is a tuple of ``S`` trees shaped ``(*lead, *trace_shape)``, one per state. Each
is contiguous, so every update and contraction is one plain fused loop (a trailing
state axis made XLA emit strided copies).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .. import registry
from ..backend import cpu_code_path
from ..compiler.graph import ETPGraph, Relation
from .wiring import (
    add_into,
    op_weights,
    per_sample,
    sum_lead,
    to_outputs,
    weight_structs,
    with_lead,
    zero_after,
)

__all__ = [
    "init_relation",
    "credit_relation",
    "update_relation",
    "contract",
    "materialised",
    "mapped_d",
]

_tree_map = jax.tree_util.tree_map


def _add(u, v):
    return _tree_map(lambda a, b: a + b.astype(a.dtype), u, v)


def init_relation(graph: ETPGraph, relation: Relation, param_leaves: list, dtype=None) -> tuple:
    """Zero trace of one relation: one ``(*lead, *trace_shape)`` tree per state.

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


def _batch_may_be_split() -> bool:
    """Whether a mesh is current (``jax.set_mesh``): the batch may be split over devices."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1


#: Trace elements (all samples) from which a sample loop beats one reduction on CPU.
_LOOP_ELEMENTS = 1 << 14


def _loop_over_samples(trace) -> bool:
    """Whether :func:`contract` loops over the samples (CPU, large traces, no split batch).

    "CPU" is the CPU code path (:func:`braintrace.backend.cpu_code_path`). For a small
    trace (an elementwise op's, one value per neuron) the loop's per-iteration cost
    dominates and one reduction wins; its products are no larger
    than ``_LOOP_ELEMENTS``. A large trace's would be a trace-sized temporary.
    """
    size = sum(t.size for t in jax.tree_util.tree_leaves(trace))
    return cpu_code_path() and size >= _LOOP_ELEMENTS and not _batch_may_be_split()


def contract(rules, relation: Relation, signal, trace):
    """``sum_b yw_to_w(signal[b], trace[b])`` for one state (``b`` the leading axis)."""
    if not relation.lead:
        return rules.yw_to_w(signal, trace)
    # Per-sample slices would move a split batch between devices: reduce it instead.
    if _loop_over_samples(trace):
        # On a CPU, a loop over the samples reads each one's (cache-sized) block once
        # and accumulates; a reduction over the leading axis strides across them all.
        # One loop per state: XLA's CPU code for a loop body that reads several
        # states' blocks, each scaled by its own signal, is several times slower.
        def add_sample(b, total):
            block = _tree_map(lambda t: lax.dynamic_index_in_dim(t, b, keepdims=False), trace)
            return _add(total, rules.yw_to_w(signal[b], block))

        first = rules.yw_to_w(signal[0], _tree_map(lambda t: t[0], trace))
        return lax.fori_loop(1, signal.shape[0], add_sample, first)
    return sum_lead(jax.vmap(rules.yw_to_w)(signal, trace), relation)


def credit_relation(graph: ETPGraph, relation: Relation, param_leaves, trace, signal, grads):
    """Add ``<signal, trace>`` for one relation into ``grads`` (by params leaf).

    ``signal`` is ``dL/dh`` of the relation's group, stacked on a trailing state axis.
    """
    op = graph.ops[relation.op]
    signal = to_outputs(graph, relation, signal)
    dtrace = functools.reduce(
        _add, (contract(op.rules, relation, signal[..., a], t) for a, t in enumerate(trace))
    )
    w = op_weights(graph, relation.op, param_leaves)
    add_into(grads, op.trainables, op.rules.trace_to_dw(dtrace, w))


def _scaler(op, relation: Relation):
    """``yw_to_w`` over the relation's samples.

    A batched op's own rule already maps its leading batch axis, so it is called on
    the whole batch: mapping one-sample batches adds unit axes that keep XLA from
    updating the trace in place (it then copies the trace every step).
    """
    if op.batched and relation.lead:
        rule = registry.get_rule(op.primitive, "yw_to_w")
        return functools.partial(rule, **op.params)
    return per_sample(op.rules.yw_to_w, relation, (0, 0))


def mapped_d(graph: ETPGraph, parts) -> tuple:
    """Per relation, ``D`` seen per element of the op's output (``to_outputs``)."""
    return tuple(to_outputs(graph, r, parts.d[r.group]) for r in graph.relations)


def materialised(parts, count):
    """``parts`` computed once, before the weight-sized trace updates read them.

    Left to XLA's fusion, the elementwise chains behind ``D`` and ``D_f`` (small, per
    neuron) are inlined into each trace-sized update and recomputed for every trace
    element; ``optimization_barrier`` does not stop that on CPU. A conditional does:
    its predicate, ``(count | 1) != 0``, is always true, but not provably so to XLA.
    Other backends keep the fusion (recomputing there is cheaper than a conditional,
    whose predicate a GPU reads back to the host), and so does a CPU under
    ``BRAINTRACE_ACCELERATOR_PATH=1`` (:func:`braintrace.backend.cpu_code_path`).
    """
    if not cpu_code_path():
        return parts
    always = (jnp.ravel(count)[0] | 1) != 0
    zeros = _tree_map(jnp.zeros_like, parts)
    return lax.cond(always, lambda p: p, lambda p: zeros, parts)


def write_order(group, couples=None) -> tuple:
    """The states of ``group`` in an order that lets every update overwrite its trace.

    State ``a``'s new trace reads the old traces of the states it couples to
    (``couples(a, c)``, default ``group.couples``), so ``a`` is written only after
    every other state that reads it. A cycle between states (each reads the other)
    cannot be ordered; its states keep their index order and XLA double-buffers them.
    """
    couples = group.couples if couples is None else couples
    pending = list(range(group.num_states))
    order: list = []
    while pending:
        ready = [a for a in pending if not any(couples(b, a) for b in pending if b != a)]
        order.append(ready[0] if ready else pending[0])
        pending.remove(order[-1])
    return tuple(order)


def update_relation(
    graph: ETPGraph, relation: Relation, param_leaves, trace, parts, d=None, couples=None
) -> tuple:
    """One step of the D-RTRL recursion for one relation.

    Structurally zero blocks of ``D`` (where ``couples(a, c)``, default
    ``group.couples``, is false) and of ``D_f`` are skipped, and the states are
    written in :func:`write_order`, each made to wait (a data edge) for the one
    before it: then no update overwrites a trace another update still has to read,
    and XLA updates every trace in place.
    """
    op = graph.ops[relation.op]
    group = graph.groups[relation.group]
    couples = group.couples if couples is None else couples
    w = op_weights(graph, relation.op, param_leaves)
    x = parts.xs[relation.op]
    scale = _scaler(op, relation)
    x_axis = 0 if (x is not None and op.batched) else None
    fresh = per_sample(lambda x_, df_: op.rules.xy_to_trace(x_, df_, w), relation, (x_axis, 0))
    if d is None:  # else: the caller mapped D to the op's outputs (see mapped_d)
        d = to_outputs(graph, relation, parts.d[relation.group])
    df = parts.df[relation.index]

    def new_state(a, after):
        da, dfa = d[..., a, :] + after, df[..., a] + after
        terms = [scale(da[..., c], trace[c]) for c, _ in enumerate(trace) if couples(a, c)]
        if relation.reaches_state(a):
            terms.append(fresh(x, dfa))
        if not terms:  # nothing ever reaches this state: its trace stays zero
            return trace[a]
        # Accumulate in the factors' precision; store in the trace's dtype.
        total = functools.reduce(_add, terms)
        return _tree_map(lambda new, old: new.astype(old.dtype), total, trace[a])

    # States are few (1-3), so the recursion is unrolled over them.
    new: dict = {}
    after = jnp.zeros((), d.dtype)
    for a in write_order(group, couples):
        new[a] = new_state(a, after)
        after = zero_after(new[a]).astype(d.dtype)
    return tuple(new[a] for a in range(len(trace)))
