"""D-RTRL: a parameter-dimension eligibility trace per relation (``docs/algorithms.md``, "D-RTRL").

Memory O(|W| S) per sample. Exact (equal to BPTT) in the exact class; otherwise the
"diagonal" approximation drops the off-diagonal recurrent Jacobian.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .base import Algorithm, add_bytes
from .relation import (
    credit_relation,
    init_relation,
    mapped_d,
    materialised,
    update_relation,
)

__all__ = ["D_RTRL", "DRTRLTraces"]


class DRTRLTraces(NamedTuple):
    """D-RTRL's state: per relation, a tuple of ``S`` per-state trace trees.

    Each tree has the op's trace shape (its trainables' shapes, or the effective
    weight's for LoRA) with the leading batch axis when the learner is batched.
    """

    relations: tuple


class D_RTRL(Algorithm):
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
        Meant for accelerators with native bfloat16.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace as bt
    >>> algo = bt.D_RTRL()
    >>> compact = bt.D_RTRL(trace_dtype=jnp.bfloat16)
    """

    name = "d_rtrl"
    traced = True

    def __init__(self, *, trace_dtype=None):
        self.trace_dtype = None if trace_dtype is None else jnp.dtype(trace_dtype)
        if self.trace_dtype is not None and not jnp.issubdtype(self.trace_dtype, jnp.floating):
            raise TypeError(f"D_RTRL: trace_dtype must be a floating dtype, got {trace_dtype}.")

    def __repr__(self) -> str:
        if self.trace_dtype is None:
            return "D_RTRL()"
        return f"D_RTRL(trace_dtype={self.trace_dtype.name})"

    def init_traces(self, graph, param_leaves, key=None) -> DRTRLTraces:
        return DRTRLTraces(
            tuple(init_relation(graph, r, param_leaves, self.trace_dtype) for r in graph.relations)
        )

    def op_trace_bytes(self, graph, param_leaves) -> dict:
        traces = jax.eval_shape(lambda: self.init_traces(graph, param_leaves))
        per_op: dict = {}
        for r, trace in zip(graph.relations, traces.relations):
            add_bytes(per_op, r.op, graph, trace)
        return per_op

    def credit(self, graph, param_leaves, traces, signals, count) -> dict:
        grads: dict = {}
        for r, trace in zip(graph.relations, traces.relations):
            credit_relation(graph, r, param_leaves, trace, signals.groups[r.group], grads)
        return grads

    def propagator(self, graph, parts):
        """``(D per group, couples(group) -> predicate)``: what carries the traces a step.

        D-RTRL's is the compiler's ``D`` (ETP outputs held fixed) and its structural
        zeros (``HiddenGroup.couples``).
        """
        return parts.d, lambda group: group.couples

    def update(self, graph, param_leaves, traces, parts, count) -> DRTRLTraces:
        d, couples = self.propagator(graph, parts)
        parts = dataclasses.replace(parts, d=d, loops=())
        # D seen per op output (index maps gathered once here, not inside every
        # trace-sized update) replaces the per-group D among the materialised factors.
        factors = (dataclasses.replace(parts, d=()), mapped_d(graph, parts))
        parts, ds = materialised(factors, count)
        return DRTRLTraces(
            tuple(
                update_relation(
                    graph, r, param_leaves, trace, parts, d, couples(graph.groups[r.group])
                )
                for r, trace, d in zip(graph.relations, traces.relations, ds)
            )
        )
