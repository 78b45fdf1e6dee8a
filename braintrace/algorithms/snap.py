"""SnAp-1: D-RTRL's traces carried by the diagonal of the FULL step Jacobian.

D-RTRL propagates its traces with ``D``, the per-position block of ``dh^t/dh^{t-1}``
with every ETP output held fixed. SnAp-1 (Menick et al., 2021, with ``n = 1``) keeps
the same traces (the influence of a weight on the unit it feeds) but propagates
them with the per-position block of the full Jacobian, whose extra term runs
through a recurrent op: for a self loop (an op whose input ``x`` reads, position by
position, the group its output drives; :class:`~braintrace.compiler.graph.SelfLoop`)

    D_snap[k, a, c] = D[k, a, c] + sum_{j -> k} D_f[j, a] * dy[j]/dx[k] * dx[k]/dh_c[k]

summed over the output elements ``j`` that reach position ``k`` (one for a plain
dense op, one per gate for a fused one; ``docs/algorithms.md``, "SnAp-1"). For a
square recurrent dense op ``dy[k]/dx[k] = W[k, k]``. Where no op reads the group it
drives, ``D_snap = D`` and SnAp-1 is D-RTRL.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .. import registry
from ..compiler.errors import CompileError
from ..compiler.forward import forward
from ..compiler.report import CompileReport
from .d_rtrl import D_RTRL

__all__ = ["SnAp1"]


def _to_positions(values: jax.Array, input_index: tuple, n_pos: int, lead: int) -> jax.Array:
    """Sum per-output-element ``values`` ``(*lead, Y, S)`` into positions ``(*lead, K, S)``."""
    index = np.asarray(input_index)
    if index.size == n_pos and np.array_equal(index, np.arange(n_pos)):
        return values
    ids = np.where(index < 0, n_pos, index)  # unmapped elements land in a dropped bin
    moved = jnp.moveaxis(values, lead, 0)
    summed = jax.ops.segment_sum(moved, jnp.asarray(ids), num_segments=n_pos + 1)[:n_pos]
    return jnp.moveaxis(summed, 0, lead)


def _loop_term(graph, loop, entries, dx, df) -> jax.Array:
    """One self loop's addition to its group's ``D``, shaped ``(*group.shape, S, S)``."""
    relation = graph.relations[loop.relation]
    group = graph.groups[loop.group]
    lead, states = relation.lead, group.num_states
    n_pos = int(np.prod(group.shape[lead:]))
    through = df.reshape(df.shape[:lead] + (-1, states)) * entries.reshape(-1, 1).astype(df.dtype)
    per_position = _to_positions(through, loop.input_index, n_pos, lead)  # (*lead, K, a)
    reads = dx.reshape(dx.shape[:lead] + (n_pos, states)).astype(df.dtype)  # (*lead, K, c)
    term = per_position[..., :, None] * reads[..., None, :]
    return term.reshape(group.shape + (states, states))


def _coupling(graph, group):
    """``couples(a, c)`` of ``D_snap``: ``D``'s, plus every (reached, read) state pair."""
    extra = set()
    for loop in graph.self_loops:
        if loop.group != group.index:
            continue
        relation = graph.relations[loop.relation]
        extra |= {
            (a, c)
            for a in range(group.num_states)
            for c in range(group.num_states)
            if relation.reaches_state(a) and loop.reads[c]
        }
    return lambda a, c: group.couples(a, c) or (a, c) in extra


class SnAp1(D_RTRL):
    """SnAp-1: D-RTRL's traces and memory, propagated by the full Jacobian's diagonal.

    Where a recurrent ETP op reads the state its output drives (a tanh RNN's
    ``h W_h``, a GRU's recurrent kernels), SnAp-1 also carries each unit's trace
    through that op's own entry (``W_h[k, k]`` for unit ``k``), which D-RTRL drops;
    everywhere else it equals D-RTRL. The same memory, ``O(|W| S)`` per sample, and
    nearly the same time. The recurrent op needs the ``input_entries`` rule (the
    built-in dense and LoRA ops have it).

    Parameters
    ----------
    trace_dtype : dtype, optional
        As for :class:`~braintrace.D_RTRL`.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace as bt
    >>> from braintrace.testing import models
    >>> learner = bt.compile(models.rnn_step, models.mse, bt.SnAp1(), batched=False)
    >>> params = models.rnn_params()
    >>> state = learner.init(params, jnp.zeros(models.N), jnp.zeros(models.N_IN))
    >>> xs, ys = jnp.ones((5, models.N_IN)), jnp.zeros((5, 2))
    >>> (losses, _), grads, state = learner.scan(params, state, xs, ys)
    >>> grads["wh"].shape
    (4, 4)
    """

    name = "snap1"

    def __repr__(self) -> str:
        return "SnAp1()" if self.trace_dtype is None else f"SnAp1(trace_dtype={self.trace_dtype})"

    def forward(self, graph, params, hidden, x):
        return forward(graph, params, hidden, x, loops=bool(graph.self_loops))

    def validate(self, graph, param_leaves) -> None:
        for loop in graph.self_loops:
            op = graph.ops[loop.op]
            if not registry.has_rule(op.primitive, "input_entries"):
                raise CompileError(
                    f"SnAp1: op #{op.index} ({op.primitive.name}) reads group #{loop.group}, "
                    "which it drives, but has no 'input_entries' rule to give its own entry "
                    f"of the recurrent Jacobian; install one with "
                    f"{op.primitive.name}.register_input_entries(fn) (docs/algorithms.md, "
                    "'SnAp-1'), or use bt.D_RTRL()."
                )

    def describe(self, report: CompileReport, graph) -> CompileReport:
        """D-RTRL's report, warning where an op reads its group other than per position
        (SnAp-1 then adds nothing through it)."""
        notes = tuple(f"SnAp-1 keeps D-RTRL's diagonal: {note}" for note in graph.loop_notes)
        return dataclasses.replace(report, warnings=report.warnings + notes)

    def propagator(self, graph, parts):
        d = list(parts.d)
        for loop, (entries, dx) in zip(graph.self_loops, parts.loops):
            term = _loop_term(graph, loop, entries, dx, parts.df[loop.relation])
            d[loop.group] = d[loop.group] + term.astype(d[loop.group].dtype)
        return tuple(d), lambda group: _coupling(graph, group)
