"""Reverse passes through a step, kept per sample: ``r^T dh'/dtheta`` and ``r^T dh'/dh``.

RTRL needs every row of the step's Jacobians (``r = e_k``), UORO one random row
(``r = nu``), both per sample. The state part is easy: a reverse pass through a
batched step keeps the samples apart in ``dh'/dh``. The parameter part is not: a
reverse pass through the batch sums the parameter cotangents over the samples.

Two routes give them per sample. A leaf that reaches the state only as a trainable
input of batched ETP ops takes the fast one: one reverse pass through the batched
program, seeded at the new state, yields every such op's output cotangent ``y_bar``
per sample, and the op's own rule gives ``xy_to_dw(x, y_bar)`` per sample (the rule
D-RTRL uses for its instantaneous term; ``docs/algorithms.md``, "Rule slots"). Any
other leaf (plain ``jnp``, an unbatched op, an unbatched learner) takes the general
one: a reverse pass through the step run on each sample as a batch of one. On a CPU
the fast route is several times faster for dense weights: XLA writes the general
route's per-sample weight cotangents transposed and copies them once more.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import registry
from ..compiler import program as prog
from ..compiler.graph import ETPGraph
from . import whole_step as ws
from .engine import with_values
from .wiring import op_weights

__all__ = ["Rows", "rule_leaves", "reverse_rows"]


class Rows(NamedTuple):
    """Reverse passes of ``R`` cotangent rows ``r`` through one step, per sample.

    Attributes
    ----------
    params : list
        Per influenced ``params`` leaf, ``r^T dh'/dleaf`` shaped ``(*lead, R, *leaf.shape)``.
    state : Array
        ``r^T dh'/dh`` over the flat float state, ``(*lead, R, H)``.
    """

    params: list
    state: jax.Array


def _trainable_uses(graph: ETPGraph, leaf: int, by_node: dict) -> tuple | None:
    """The batched ops ``leaf`` is a trainable input of, or ``None`` if it has another use
    (``by_node``: the batched ops by program node)."""
    vid = graph.program.inputs[leaf]
    if vid in graph.program.outputs:
        return None
    ops = []
    for index, node in enumerate(graph.program.nodes):
        for j, atom in enumerate(node.inputs):
            if atom != vid:
                continue
            op = by_node.get(index)
            if (
                op is None
                or j not in registry.get_trainable_invars(op.primitive, op.params).values()
            ):
                return None
            ops.append(op.index)
    return tuple(sorted(set(ops))) or None


def rule_leaves(graph: ETPGraph) -> dict:
    """Influenced leaf -> the batched ETP ops it is a trainable input of, for the leaves
    used only that way (the fast route); empty for an unbatched graph."""
    if not graph.batched:
        return {}
    by_node = {op.node: op for op in graph.ops if op.batched}
    found = {leaf: _trainable_uses(graph, leaf, by_node) for leaf in ws.influenced(graph)}
    return {leaf: ops for leaf, ops in found.items() if ops}


def _linearised(graph: ETPGraph, param_leaves: list, inputs: ws.StepInputs, ops) -> tuple:
    """``(vjp_fn, xs)``: the batched step's reverse pass from the new float state to
    (the outputs of ``ops``, the old float state), and each op's input ``x``."""
    params = jax.tree_util.tree_unflatten(graph.params_def, param_leaves)
    hidden_leaves = jax.tree_util.tree_leaves(inputs.hidden)
    node_op = {graph.ops[k].node: graph.ops[k] for k in ops}

    def run(deltas, floats):
        hidden = jax.tree_util.tree_unflatten(
            graph.hidden_def, with_values(hidden_leaves, ws.state_leaves(graph), floats)
        )
        recorded = {}

        def after(index, node, invals, outvals):
            op = node_op.get(index)
            if op is not None:
                recorded[op.index] = invals[op.x_index]
                outvals[op.y_index] = outvals[op.y_index] + deltas[op.index]
            return outvals

        flat_args = graph.flat_args(params, hidden, inputs.x)
        outs = prog.evaluate(graph.program, flat_args, after=after)
        return [outs[i] for i in ws.state_leaves(graph)], recorded

    deltas = {k: jnp.zeros(graph.ops[k].y_aval.shape, graph.ops[k].y_aval.dtype) for k in ops}
    floats = [hidden_leaves[i] for i in ws.state_leaves(graph)]
    _, vjp_fn, xs = jax.vjp(run, deltas, floats, has_aux=True)
    return vjp_fn, xs


def _general(graph, param_leaves, inputs, rows, sel: tuple, with_state: bool) -> tuple:
    """Per sample, ``(param rows of sel, state rows or None)`` by the batch-of-one route."""

    def one(inputs_b, rows_b):  # rows_b: (R, H)
        f = ws.sample_fn(graph, param_leaves, inputs_b, sel)
        h = ws.flat_state(graph, jax.tree_util.tree_leaves(inputs_b.hidden), 0)
        theta = [param_leaves[i] for i in sel]
        if not with_state:
            _, vjp_fn = jax.vjp(lambda t: f(t, h), theta)
            return list(jax.vmap(vjp_fn)(rows_b)[0]), None
        _, vjp_fn = jax.vjp(f, theta, h)
        d_theta, d_h = jax.vmap(vjp_fn)(rows_b)
        return list(d_theta), d_h

    lead = 1 if graph.batched else 0
    return ws.per_sample(graph, one)(inputs, jnp.moveaxis(rows, 0, lead))


def _fast(graph, param_leaves, inputs, rows, fast: dict) -> tuple:
    """``({leaf: (B, R, *shape)}, state rows (B, R, H))`` by one batched reverse pass."""
    ops = sorted({k for found in fast.values() for k in found})
    vjp_fn, xs = _linearised(graph, param_leaves, inputs, ops)
    y_bars, h_bars = jax.vmap(vjp_fn)(ws.split_state(graph, rows, 2))
    state = jnp.moveaxis(ws.flat_state(graph, h_bars, 2), 0, 1)
    out: dict = {}
    for k in ops:
        op = graph.ops[k]
        w = op_weights(graph, k, param_leaves)
        per_row = jax.vmap(lambda x, g, op=op, w=w: op.rules.xy_to_dw(x, g, w), in_axes=(None, 0))
        dw = jax.vmap(per_row, in_axes=(0, 1))(xs[k], y_bars[k])  # (B, R, *shape)
        for name, leaf in op.trainables.items():
            if leaf in fast:
                out[leaf] = out[leaf] + dw[name] if leaf in out else dw[name]
    return out, state


def reverse_rows(
    graph: ETPGraph, param_leaves: list, inputs: ws.StepInputs, rows, *, state: bool = True
) -> Rows:
    """The reverse passes of the cotangent ``rows`` through one step, per sample.

    ``rows`` is ``(R, *lead, H)`` (``lead``: the batch axis of a batched graph);
    ``inputs`` is the step's :class:`~.whole_step.StepInputs`. With ``state=False``
    the state rows may be left out (``Rows.state`` is then ``None`` or computed).
    """
    fast = rule_leaves(graph)
    sel = tuple(i for i in ws.influenced(graph) if i not in fast)
    out: dict = {}
    state_rows = None
    if fast:
        out, state_rows = _fast(graph, param_leaves, inputs, rows, fast)
    need_state = state and state_rows is None
    if sel or need_state:
        general, general_state = _general(graph, param_leaves, inputs, rows, sel, need_state)
        out.update(zip(sel, general))
        state_rows = general_state if state_rows is None else state_rows
    return Rows([out[i] for i in ws.influenced(graph)], state_rows)
