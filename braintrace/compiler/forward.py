"""One evaluation of a step: its outputs, each op's input ``x``, ``D`` and ``D_f``.

:func:`forward` runs the flattened program node by node. Every node is bound once
on the real (differentiable) values, so an enclosing ``jax.vjp`` differentiates the
step as written; next to it, the node's forward-mode tangents are propagated over
``sum_g S_g + #traced ops`` directions at the same values (held out of the enclosing
differentiation by ``stop_gradient``). ETP outputs are held fixed in those tangents
(an ETP node only emits its own ``y`` direction) and non-position-preserving
operands are cut, so the tangents reaching the new hidden state are ``D`` and
``D_f`` (see "D-RTRL" and "Index maps" in ``docs/algorithms.md``). Nothing is
evaluated twice: the ETP ops' forward runs once, and the tangents reuse it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import registry
from . import index_maps
from . import program as prog
from .graph import ETPGraph, StepParts
from .program import is_inexact

__all__ = ["forward", "directions"]

_sg = jax.lax.stop_gradient


class Direction(NamedTuple):
    """One tangent direction: state ``part`` of group ``index`` (kind ``'h'``), or the
    elements of class ``part`` of op ``index``'s output (kind ``'y'``)."""

    kind: str  # 'h' or 'y'
    index: int  # group index ('h') or op index ('y')
    part: int = 0


def _num_classes(graph: ETPGraph, op: int) -> int:
    classes = graph.classes_of(op)
    return 1 if classes is None else max(classes) + 1


def directions(graph: ETPGraph) -> tuple[Direction, ...]:
    """The tangent directions of :func:`forward`: every group state, then every traced
    op's output (one direction per class of an index-mapped output)."""
    found = [Direction("h", g.index, c) for g in graph.groups for c in range(g.num_states)]
    for k in graph.traced_ops:
        found += [Direction("y", k, c) for c in range(_num_classes(graph, k))]
    return tuple(found)


def _one_hot(n: int, slot: int, value) -> jax.Array:
    """``(n, *value.shape)`` zeros with ``value`` at ``slot`` (``ones_like`` for an array
    that is only a shape: a hidden leaf)."""
    pick = (jnp.arange(n) == slot).astype(value.dtype)
    return pick.reshape((n,) + (1,) * jnp.ndim(value)) * value


def _bind(node, invals, forward_mode: bool) -> list:
    if forward_mode and node.primitive.name in prog.CUSTOM_VJP:
        out = prog._bind_forward(node.primitive, node.params, invals)
    else:
        out = prog.bind(node.primitive, node.params, invals)
    return list(out) if node.primitive.multiple_results else [out]


def _node_tangents(node, primals: list, tangents: list) -> list:
    """Tangents of ``node``'s results over the leading direction axis of ``tangents``.

    ``tangents[j]`` is ``None`` where operand ``j`` carries no tangent (or is cut).
    """
    live = [j for j, t in enumerate(tangents) if t is not None]

    def fn(*values):
        full = list(primals)
        for j, v in zip(live, values):
            full[j] = v
        return _bind(node, full, forward_mode=True)

    def one(*ts):
        return jax.jvp(fn, [primals[j] for j in live], list(ts))[1]

    outs = jax.vmap(one)(*[tangents[j] for j in live])
    return [t if is_inexact(v.aval) else None for t, v in zip(outs, node.eqn.outvars)]


class _Run:
    """State of one evaluation: values, tangents, the recorded op inputs and, when asked
    for, the self loops' parts (see :class:`~braintrace.compiler.graph.SelfLoop`)."""

    def __init__(self, graph: ETPGraph, flat_args: list, seeds: dict, loop_slots=None):
        self.graph = graph
        self.env = dict(zip(graph.program.inputs, flat_args))
        self.tan = seeds  # value id -> (n_dir, *shape) tangent
        self.xs: list = [None] * len(graph.ops)
        #: Per self loop, the tangent directions of its group's states (None: not asked).
        self.loop_slots = loop_slots
        self.loops: list = [None] * len(graph.self_loops)

    def read(self, atom):
        return atom.value if isinstance(atom, prog.Const) else self.env[atom]

    def read_tangent(self, atom):
        return None if isinstance(atom, prog.Const) else self.tan.get(atom)


def _etp_tangents(run: _Run, op, node, invals, intans, y_seeds) -> list:
    """An ETP node's output tangents: held fixed, except its own ``y`` direction."""
    outs: list = [None] * len(node.outputs)
    x_tan = intans[op.x_index] if op.x_index is not None else None
    if x_tan is not None and registry.is_gradient_enabled(op.primitive):
        only_x = [t if j == op.x_index else None for j, t in enumerate(intans)]
        outs = _node_tangents(node, [_sg(v) for v in invals], only_x)
    seed = y_seeds.get(op.index)
    if seed is not None:
        old = outs[op.y_index]
        outs[op.y_index] = seed if old is None else old + seed
    return outs


def _record_loops(run: _Run, op, node, invals, intans) -> None:
    """For each self loop of ``op``: its input-Jacobian entries and ``dx/dh^{t-1}``."""
    for i, loop in enumerate(run.graph.self_loops):
        if loop.op != op.index:
            continue
        rule = registry.get_rule(op.primitive, "input_entries")
        index = np.asarray(loop.input_index)
        entries = rule(*[_sg(v) for v in invals], input_index=index, **node.params)
        x_tan = intans[op.x_index]
        slots = run.loop_slots[i]
        if x_tan is None:
            dx = jnp.zeros(tuple(op.x_aval.shape) + (len(slots),), op.x_aval.dtype)
        else:
            dx = jnp.moveaxis(_sg(x_tan)[jnp.asarray(slots)], 0, -1)
        run.loops[i] = (entries, dx)


def _step_nodes(run: _Run, y_seeds: dict, with_tangents: bool) -> None:
    graph = run.graph
    node_op = {op.node: op for op in graph.ops}
    for index, node in enumerate(graph.program.nodes):
        invals = [run.read(a) for a in node.inputs]
        outvals = _bind(node, invals, forward_mode=False)
        op = node_op.get(index)
        if op is not None and op.x_index is not None:
            run.xs[op.index] = _sg(invals[op.x_index])
        if with_tangents:
            cut = graph.cut_nodes.get(index, ())
            intans = [None if j in cut else run.read_tangent(a) for j, a in enumerate(node.inputs)]
            if op is not None and run.loop_slots is not None:
                _record_loops(run, op, node, invals, intans)
            if op is not None:
                outtans = _etp_tangents(run, op, node, invals, intans, y_seeds)
            elif any(t is not None for t in intans):
                outtans = _node_tangents(node, [_sg(v) for v in invals], intans)
            else:
                outtans = []
            for vid, t in zip(node.outputs, outtans):
                if t is not None:
                    run.tan[vid] = t
        run.env.update(zip(node.outputs, outvals))


def _class_mask(graph: ETPGraph, op: int, part: int):
    """Ones on the elements of class ``part`` of the op's output (all of it: no classes)."""
    info = graph.ops[op]
    ones = jnp.ones(info.y_aval.shape, info.y_aval.dtype)
    classes = graph.classes_of(op)
    if classes is None:
        return ones
    _, y_var = info.sample_vars()
    mask = (np.asarray(classes) == part).reshape(y_var.shape)
    return ones * jnp.asarray(mask, info.y_aval.dtype)


def _seeds(graph: ETPGraph, flat_args: list, n_params: int, dirs) -> tuple[dict, dict]:
    """Unit tangents: each group state's leaf, and each traced op's output (per class)."""
    h_seeds, y_seeds = {}, {}
    for d, direction in enumerate(dirs):
        if direction.kind == "h":
            leaf = graph.groups[direction.index].leaves[direction.part]
            vid = graph.program.inputs[n_params + leaf]
            h_seeds[vid] = _one_hot(len(dirs), d, jnp.ones_like(_sg(flat_args[n_params + leaf])))
        else:
            seed = _one_hot(len(dirs), d, _class_mask(graph, direction.index, direction.part))
            old = y_seeds.get(direction.index)
            y_seeds[direction.index] = seed if old is None else old + seed
    return h_seeds, y_seeds


def _mapped_df(graph: ETPGraph, relation, per_class: list) -> jax.Array:
    """``D_f`` per element of ``y`` from per-class tangents at the group's positions.

    ``per_class[c]`` has shape ``(*lead, *positions, S)``; element ``j`` of ``y``
    reads class ``classes[j]`` at position ``index_map[j]`` (zero where it reaches none).
    """
    op = graph.ops[relation.op]
    _, y_var = op.sample_vars()
    lead = per_class[0].shape[: relation.lead]
    flat = [t.reshape(lead + (-1, t.shape[-1])) for t in per_class]
    picked = index_maps.take_mapped(
        flat, graph.classes_of(relation.op), relation.index_map, relation.lead
    )  # (*lead, Y, S)
    return picked.reshape(lead + tuple(y_var.shape) + (picked.shape[-1],))


def _blocks(graph: ETPGraph, run: _Run, n_hidden: int, dirs) -> tuple[tuple, tuple]:
    """``D`` per group and ``D_f`` per relation from the new hidden state's tangents."""
    slot = {(dr.kind, dr.index, dr.part): d for d, dr in enumerate(dirs)}
    outputs = graph.program.outputs[:n_hidden]

    def state_tangent(leaf, d):
        t = run.read_tangent(outputs[leaf])
        aval = graph.hidden_avals[leaf]
        return jnp.zeros(aval.shape, aval.dtype) if t is None else t[d]

    def block(group, d):
        return jnp.stack([state_tangent(leaf, d) for leaf in group.leaves], axis=-1)

    d_blocks = tuple(
        jnp.stack([block(g, slot[("h", g.index, c)]) for c in range(g.num_states)], axis=-1)
        for g in graph.groups
    )
    df = []
    for r in graph.relations:
        group = graph.groups[r.group]
        per_class = [block(group, slot[("y", r.op, c)]) for c in range(_num_classes(graph, r.op))]
        df.append(sum(per_class) if r.index_map is None else _mapped_df(graph, r, per_class))
    return d_blocks, tuple(df)


def _loop_slots(graph: ETPGraph, dirs) -> tuple:
    """Per self loop, the tangent directions of its group's states, in state order."""
    slot = {(dr.kind, dr.index, dr.part): d for d, dr in enumerate(dirs)}
    return tuple(
        tuple(slot[("h", loop.group, c)] for c in range(graph.groups[loop.group].num_states))
        for loop in graph.self_loops
    )


def forward(
    graph: ETPGraph,
    params: Any,
    hidden: Any,
    x: Any,
    *,
    tangents: bool = True,
    loops: bool = False,
):
    """Evaluate one step once: ``(new_hidden, out, parts)``.

    ``new_hidden`` and ``out`` are differentiable in ``params`` and ``hidden`` (an
    enclosing ``jax.vjp`` sees the step as written). ``parts`` (a
    :class:`~braintrace.compiler.graph.StepParts`) holds each op's input and the
    ``D``/``D_f`` blocks, computed at the same values and constant to an enclosing
    differentiation; with ``tangents=False`` only the inputs are recorded and
    ``parts.d``/``parts.df`` are empty. ``loops=True`` (with tangents) also records
    ``parts.loops``, what ``SnAp1`` adds to ``D`` for each self loop.
    """
    flat = graph.flat_args(params, hidden, x)
    n_params = len(jax.tree_util.tree_leaves(params))
    n_hidden = len(graph.hidden_avals)
    dirs = directions(graph) if tangents else ()
    h_seeds, y_seeds = _seeds(graph, flat, n_params, dirs)
    run = _Run(graph, flat, h_seeds, _loop_slots(graph, dirs) if loops and dirs else None)
    _step_nodes(run, y_seeds, bool(dirs))
    d, df = _blocks(graph, run, n_hidden, dirs) if dirs else ((), ())
    outs = [run.read(a) for a in graph.program.outputs]
    new_hidden = jax.tree_util.tree_unflatten(graph.hidden_def, outs[:n_hidden])
    out = jax.tree_util.tree_unflatten(graph.out_def, outs[n_hidden:])
    loop_parts = tuple(run.loops) if run.loop_slots is not None else ()
    return new_hidden, out, StepParts(xs=tuple(run.xs), d=d, df=df, loops=loop_parts)
