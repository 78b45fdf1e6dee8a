"""What every learning algorithm is: its trace state, credit and update, and its window.

An :class:`Algorithm` owns its behaviour. The learner asks it for zero traces
(:meth:`~Algorithm.init_traces`), for the trace credit of a learning signal
(:meth:`~Algorithm.credit`), for the traces after a step (:meth:`~Algorithm.update`)
and for the window it runs a whole sequence in (:meth:`~Algorithm.window_length`).
The base class is the algorithm with no traces at all; ``D_RTRL`` and ``pp_prop``
override the trace methods, ``BPTT`` the window.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..compiler.forward import forward
from ..compiler.graph import ETPGraph, StepParts
from ..compiler.report import CompileReport

__all__ = ["LearnerState", "Algorithm", "NoTraces", "OnlineAlgorithm", "Signals"]


class LearnerState(NamedTuple):
    """The learner's carry: a pytree, so it goes through ``jit``, ``scan`` and ``vmap``.

    Attributes
    ----------
    hidden : pytree
        The model's current hidden state ``h^t``.
    traces : pytree
        The algorithm's eligibility traces (a ``NamedTuple`` of the algorithm's own;
        :class:`NoTraces` for ``OneStep`` and ``BPTT``). With ``batched=True`` every
        leaf has the leading batch axis: traces are kept per sample.
    count : Array
        Trace updates so far, per sample: ``int32`` of shape ``(B,)`` when batched,
        a scalar otherwise. :meth:`braintrace.Learner.reset` zeroes it per sample.
    """

    hidden: Any
    traces: Any
    count: jax.Array


class NoTraces(NamedTuple):
    """The trace state of an algorithm without traces (``OneStep``, ``BPTT``)."""


class Signals(NamedTuple):
    """The learning signal ``dL/dh^{t0-1}`` of a step or window, in two layouts.

    Attributes
    ----------
    leaves : tuple
        Per flat ``hidden`` leaf, its signal (``None`` for a leaf that is not float).
    groups : dict
        Group index -> the group's leaves stacked on a trailing state axis, for the
        groups some relation trains (what the per-group traces contract with).
    """

    leaves: tuple
    groups: dict


class Algorithm:
    """Base class of the learning algorithms; on its own, the algorithm with no traces.

    Every step's gradient is the exact one-step reverse pass plus, for trace-trained
    parameters, :meth:`credit` (``docs/algorithms.md``, "The learning signal").
    Subclasses that keep traces set ``traced = True`` and override
    :meth:`init_traces`, :meth:`credit` and :meth:`update`.
    """

    name = "algorithm"
    #: Whether the algorithm keeps eligibility traces (and so needs ``D``, ``D_f``).
    traced = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def window_length(self, num_steps: int) -> int | None:
        """Steps per window when ``learner.scan`` gets ``window=None``: ``None`` = one step."""
        return None

    def init_traces(self, graph: ETPGraph, param_leaves: list, key=None) -> Any:
        """Zero traces for ``graph`` (per sample when the graph is batched).

        ``key`` (a ``jax.random`` key, or ``None``) seeds an algorithm that draws
        random numbers (``UORO``); the deterministic algorithms ignore it.
        """
        return NoTraces()

    def reset_traces(self, traces) -> Any:
        """The traces a sample restarts an episode from (zeros; a key stream goes on)."""
        return jax.tree_util.tree_map(jnp.zeros_like, traces)

    def credit(self, graph: ETPGraph, param_leaves: list, traces, signals: Signals, count) -> dict:
        """``{params leaf index: <dL/dh^{t-1}, eps^{t-1}>}`` for the trace-trained leaves."""
        return {}

    def forward(self, graph: ETPGraph, params, hidden, x) -> tuple:
        """One evaluation of the step: ``(new_hidden, out, parts)``.

        ``new_hidden`` and ``out`` are differentiable in ``params`` and ``hidden``;
        ``parts`` is what :meth:`update` reads of the step, constant to an enclosing
        differentiation. Default: each op's ``x`` with ``D`` and ``D_f``
        (:func:`braintrace.compiler.forward.forward`).
        """
        return forward(graph, params, hidden, x)

    def validate(self, graph: ETPGraph, param_leaves: list) -> None:
        """Refuse a graph this algorithm cannot train (say why); called before use."""

    def describe(self, report: CompileReport, graph: ETPGraph) -> CompileReport:
        """The compile report as it holds under this algorithm (default: D-RTRL's)."""
        return report

    def update(self, graph: ETPGraph, param_leaves: list, traces, parts: StepParts, count):
        """The traces after a step: ``eps^t`` from ``eps^{t-1}`` and the step's parts."""
        return traces

    def trace_bytes(self, graph: ETPGraph, param_leaves: list) -> int:
        """Trace memory per sample, in bytes."""
        shapes = jax.eval_shape(lambda: self.init_traces(graph, param_leaves))
        return sample_bytes(graph, shapes)

    def op_trace_bytes(self, graph: ETPGraph, param_leaves: list) -> dict:
        """Trace memory per sample of each op (``{op index: bytes}``), for an algorithm
        whose traces belong to ops; empty otherwise (RTRL's and UORO's are per leaf)."""
        return {}


def sample_bytes(graph: ETPGraph, tree) -> int:
    """Bytes per sample of a pytree of arrays (or shapes) with the graph's batch axis."""
    total = sum(
        int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree)
    )
    return total // math.prod(graph.batch_lead)


def add_bytes(per_op: dict, op: int, graph: ETPGraph, tree) -> None:
    """Add ``tree``'s bytes per sample to op ``op``'s entry of ``per_op`` (none: no entry)."""
    if jax.tree_util.tree_leaves(tree):
        per_op[op] = per_op.get(op, 0) + sample_bytes(graph, tree)


#: Old name of the base of the trace-keeping algorithms (kept for imports).
OnlineAlgorithm = Algorithm
