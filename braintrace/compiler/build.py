"""Compile a step function into its eligibility-trace graph.

:func:`compile_graph` traces ``step(params, hidden, x) -> (new_hidden, out)``,
finds the ETP ops and the parameters they train, groups the hidden leaves, finds
which op feeds which group through position-preserving paths (the relations), and
returns an :class:`~braintrace.compiler.graph.ETPGraph` with its report.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import registry
from ..primitive import compiling
from . import index_maps
from . import program as prog
from .analysis import Analysis
from .eqns import contains_primitive, sub_jaxprs
from .errors import CompileError
from .graph import ETPGraph, HiddenGroup, OpInfo, Relation, SelfLoop
from .paths import analyse, merge
from .program import is_inexact
from .reach import trace_routes
from .report import build_report

__all__ = ["compile_graph"]


def _path_str(path) -> str:
    """``keystr`` of a leaf path (``''`` for a bare-array tree)."""
    return jax.tree_util.keystr(path)


class _UnionFind:
    def __init__(self, items):
        self.parent = {i: i for i in items}

    def find(self, i):
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _flatten_named(name, tree):
    try:
        pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CompileError(f"cannot flatten {name}: {err}") from err
    paths, leaves = [], []
    for path, leaf in pairs:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            try:
                leaf = jnp.asarray(leaf)
            except TypeError as err:
                raise CompileError(
                    f"{name}{_path_str(path)} is a {type(leaf).__name__}, not an array; "
                    f"every leaf of {name} must be an array."
                ) from err
        paths.append(_path_str(path))
        leaves.append(leaf)
    return tuple(paths), tuple(leaves), treedef


@dataclasses.dataclass(frozen=True)
class _Flat:
    """The step's example arguments as flat leaves, with their paths and treedefs."""

    p_paths: tuple
    p_leaves: tuple
    pdef: Any
    h_paths: tuple
    h_leaves: tuple
    hdef: Any
    x_paths: tuple
    x_leaves: tuple
    xdef: Any

    @property
    def n_p(self) -> int:
        return len(self.p_leaves)

    @property
    def n_h(self) -> int:
        return len(self.h_leaves)

    @property
    def leaves(self) -> tuple:
        return self.p_leaves + self.h_leaves + self.x_leaves


def _check_batch_axis(flat: _Flat) -> None:
    sizes = {
        name: (leaf.shape[0] if leaf.ndim else None)
        for name, leaf in zip(
            [f"hidden{p}" for p in flat.h_paths] + [f"x{p}" for p in flat.x_paths],
            flat.h_leaves + flat.x_leaves,
        )
    }
    if len(set(sizes.values())) > 1 or None in sizes.values():
        listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise CompileError(
            "batched=True needs one leading batch axis of the same size on every leaf of "
            f"hidden and x; got leading sizes {listed}."
        )


def _flatten_inputs(params, hidden, x, batched: bool) -> _Flat:
    flat = _Flat(
        *_flatten_named("params", params),
        *_flatten_named("hidden", hidden),
        *_flatten_named("x", x),
    )
    if not flat.h_leaves:
        raise CompileError(
            "hidden has no leaves: there is no state to carry over time, so there is nothing "
            "to learn online. Pass the recurrent state as hidden."
        )
    if batched:
        _check_batch_axis(flat)
    return flat


def _check_result(result, hdef):
    """``(new_hidden, out)`` of the traced step, checked against ``hidden``'s structure."""
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        kind = "an array" if isinstance(result, jax.Array) else type(result).__name__
        length = f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""
        raise CompileError(f"the step must return (new_hidden, out); got {kind}{length}.")
    new_hidden, out = result
    new_flat, new_def = jax.tree_util.tree_flatten(new_hidden)
    if new_def != hdef:
        raise CompileError(
            f"the step's new_hidden has structure {new_def} but hidden has {hdef}; "
            "return the same pytree of hidden states it receives."
        )
    return new_flat, out


def _check_hidden_kept(flat: _Flat, out_avals) -> None:
    for i, path in enumerate(flat.h_paths):
        old, new = flat.h_leaves[i], out_avals[i]
        if tuple(old.shape) != tuple(new.shape) or jnp.dtype(old.dtype) != jnp.dtype(new.dtype):
            raise CompileError(
                f"hidden{path} changes across the step from {jnp.dtype(old.dtype).name}"
                f"{list(old.shape)} to {jnp.dtype(new.dtype).name}{list(new.shape)}; a hidden "
                "state must keep its shape and dtype (cast or reshape it inside the step)."
            )


def _trace(step, flat: _Flat):
    """The step's closed jaxpr over flat leaves, and the treedef of its ``out``."""
    holder = {}
    n_p, n_h = flat.n_p, flat.n_h

    def flat_step(*leaves):
        params = jax.tree_util.tree_unflatten(flat.pdef, leaves[:n_p])
        hidden = jax.tree_util.tree_unflatten(flat.hdef, leaves[n_p : n_p + n_h])
        x = jax.tree_util.tree_unflatten(flat.xdef, leaves[n_p + n_h :])
        new_flat, out = _check_result(step(params, hidden, x), flat.hdef)
        out_flat, holder["out_def"] = jax.tree_util.tree_flatten(out)
        return list(new_flat) + list(out_flat)

    with compiling():  # an op dissolving here loses its trace: say so
        closed = jax.make_jaxpr(flat_step)(*flat.leaves)
    _check_hidden_kept(flat, closed.out_avals)
    return closed, holder["out_def"]


def _producer_chain(program, atom, param_vids):
    """Names of primitives between a params leaf and ``atom`` (for error messages)."""
    producers = {vid: node for node in program.nodes for vid in node.outputs}
    chain, frontier, seen = [], [atom], set()
    while frontier:
        a = frontier.pop()
        if not isinstance(a, int) or a in seen:
            continue
        seen.add(a)
        if a in param_vids:
            return chain, param_vids[a]
        node = producers.get(a)
        if node is None:
            continue
        chain.append(node.primitive.name)
        frontier.extend(node.inputs)
    return chain, None


def _check_no_hidden_etp(program):
    for node in program.nodes:
        for sub in sub_jaxprs(node.params):
            if contains_primitive(sub, registry.is_etp_primitive):
                raise CompileError(
                    f"an ETP op sits inside a '{node.primitive.name}' (a custom_jvp/custom_vjp "
                    "function); the compiler cannot hold its output fixed there. Call the ETP "
                    "op outside it."
                )


def _source_names(sources: dict, flat: _Flat, ops) -> list:
    names = []
    for src in sorted(sources):
        if src[0] == "h":
            names.append(f"hidden{flat.h_paths[src[1]]}")
        else:
            names.append(f"the output of ETP op #{src[1]} ({ops[src[1]].primitive.name})")
    return names


def _check_while(program, taints: dict, flat: _Flat, ops) -> None:
    """A while loop may stay opaque only if no hidden state or ETP output passes it."""
    for c in program.control:
        if c.kind != "while":
            continue
        node = program.nodes[c.node]
        sources = merge(*(taints.get(a, {}) for a in node.inputs if isinstance(a, int)))
        if sources:
            raise CompileError(
                f"the step's {c.label} carries {', '.join(_source_names(sources, flat, ops))}: "
                "a while loop has no reverse mode and no static length, so nothing learnt "
                "may pass through it. Use lax.fori_loop with static bounds or lax.scan "
                "(composed, or unrolled when it holds ETP ops), or compute the loop from "
                "constants only."
            )


_HANDLING_NOTES = {
    "inlined": "every branch inlined; each sample's x, D, D_f from the branch it takes",
    "unrolled": "unrolled; one op (and one trace) per iteration",
    "composed": "D and D_f composed through every iteration (forward mode)",
    "opaque": "no hidden state or ETP output passes through it",
}


def _control_flow(program, taints: dict) -> tuple:
    """``(label, handling, note)`` of every cond, switch and loop (a kept loop is
    ``composed`` when hidden state or an ETP output passes through it, else ``opaque``)."""
    rows = []
    for c in program.control:
        handling = c.handling
        if handling == "kept":
            node = program.nodes[c.node]
            passes = any(taints.get(a) for a in node.inputs if isinstance(a, int))
            handling = "composed" if passes else "opaque"
        note = _HANDLING_NOTES[handling]
        if c.hoisted:
            note += f"; {c.hoisted} ETP op(s) moved before it (same input every iteration)"
        elif c.etp_ops:
            note += f"; holds {c.etp_ops} ETP op(s)"
        rows.append((c.label, handling, note))
    return tuple(rows)


@dataclasses.dataclass(frozen=True)
class _Leaves:
    """The flat ``params`` / ``hidden`` inputs of a program, by value id."""

    program: prog.Program
    flat: _Flat

    @functools.cached_property
    def param_vids(self) -> dict:
        return {self.program.inputs[i]: i for i in range(len(self.flat.p_paths))}

    @functools.cached_property
    def hidden_vids(self) -> dict:
        n_p = len(self.flat.p_paths)
        return {self.program.inputs[n_p + i]: i for i in range(len(self.flat.h_paths))}


def _trainable_leaf(leaves: _Leaves, atom, name: str, label: str) -> int:
    """The params leaf feeding a trainable input, or a CompileError saying what it is."""
    if isinstance(atom, int) and atom in leaves.param_vids:
        return leaves.param_vids[atom]
    if isinstance(atom, prog.Const):
        raise CompileError(
            f"{label}: its trainable input {name!r} is a constant captured by the step, "
            "not a params leaf; pass the array in params so it can be trained."
        )
    if isinstance(atom, int) and atom in leaves.hidden_vids:
        raise CompileError(
            f"{label}: its trainable input {name!r} is "
            f"hidden{leaves.flat.h_paths[leaves.hidden_vids[atom]]}; "
            "trainable inputs must be params leaves."
        )
    chain, leaf = _producer_chain(leaves.program, atom, leaves.param_vids)
    if leaf is None:
        raise CompileError(
            f"{label}: its trainable input {name!r} is computed inside the step (via "
            f"{', '.join(reversed(chain)) or 'an input'}), not a params leaf; pass the "
            "parameter itself to the op."
        )
    raise CompileError(
        f"{label}: params{leaves.flat.p_paths[leaf]} reaches its trainable input {name!r} "
        f"through {' -> '.join(reversed(chain))}; ETP ops must receive trainable parameters "
        "unchanged. Pass the raw parameter (use weight_layout='out_in' instead of a "
        "transpose, the op's dtype= instead of a cast) or store the parameter in the "
        "form the op expects."
    )


def _frozen_operands(leaves: _Leaves, node, label: str) -> dict:
    """Frozen operand name -> ``('const', value)`` or ``('param', leaf)``."""
    frozen = {}
    for name, invar in registry.get_frozen_invars(node.primitive, node.params).items():
        atom = node.inputs[invar]
        if isinstance(atom, prog.Const):
            frozen[name] = ("const", atom.value)
        elif isinstance(atom, int) and atom in leaves.param_vids:
            frozen[name] = ("param", leaves.param_vids[atom])
        else:
            raise CompileError(
                f"{label}: its frozen operand {name!r} (seen by its trace rules) is "
                "computed inside the step; it must be a constant or a params leaf, the "
                "same at every step. Compute it outside the step and close over it."
            )
    return frozen


def _op_info(leaves: _Leaves, k: int, index: int, node) -> OpInfo:
    prim = node.primitive
    label = f"ETP op #{k} ({prim.name})"
    trainables = {
        name: _trainable_leaf(leaves, node.inputs[invar], name, label)
        for name, invar in registry.get_trainable_invars(prim, node.params).items()
    }
    paths = {name: leaves.flat.p_paths[leaf] or "<root>" for name, leaf in trainables.items()}
    x_index = registry.get_x_invar_index(prim)
    y_index = registry.get_y_outvar_index(prim)
    program = leaves.program
    x_aval = None if x_index is None else program.aval_of(node.inputs[x_index])
    y_aval = program.avals[node.outputs[y_index]]
    return OpInfo(
        k,
        prim,
        dict(node.params),
        trainables,
        paths,
        x_index,
        y_index,
        x_aval,
        y_aval,
        index,
        _frozen_operands(leaves, node, label),
    )


def _is_frozen_layer(node) -> bool:
    """An ETP equation whose every trainable input is a constant of the step: a frozen
    layer (a converted layer the user does not train), evaluated like plain ``jnp``."""
    invars = registry.get_trainable_invars(node.primitive, node.params).values()
    return all(isinstance(node.inputs[i], prog.Const) for i in invars)


def _find_ops(program, flat) -> list:
    """Every trained ETP equation of ``program``, in order, with the params leaves it trains."""
    leaves = _Leaves(program, flat)
    etp = [
        (i, n)
        for i, n in enumerate(program.nodes)
        if registry.is_etp_primitive(n.primitive) and not _is_frozen_layer(n)
    ]
    return [_op_info(leaves, k, index, node) for k, (index, node) in enumerate(etp)]


def _group_hidden(float_h, out_taint, h_avals, h_paths):
    """Union hidden leaves whose update couples them position by position.

    Returns the groups and, per leaf, the couplings left out of ``D`` (paths that
    are not position-preserving, or that join leaves of different shape or dtype).
    """
    uf = _UnionFind(float_h)
    dropped: dict = {i: set() for i in float_h}
    for b in float_h:
        for src, reach in out_taint[b].items():
            if src[0] != "h":
                continue
            a = src[1]
            same = h_avals[a].shape == h_avals[b].shape and h_avals[a].dtype == h_avals[b].dtype
            if reach.ok and same:
                uf.union(a, b)
            elif reach.ok:
                dropped[b].add(f"hidden{h_paths[a]} (different shape or dtype)")
            dropped[b].update(f"hidden{h_paths[a]} via {p}" for p in sorted(reach.bad))
    members: dict = {}
    for i in float_h:
        members.setdefault(uf.find(i), []).append(i)
    groups = []
    for root in sorted(members):
        leaves = tuple(members[root])
        groups.append(
            HiddenGroup(
                len(groups),
                leaves,
                tuple(f"hidden{h_paths[i]}" for i in leaves),
                tuple(h_avals[leaves[0]].shape),
                h_avals[leaves[0]].dtype,
                _coupling(leaves, out_taint),
            )
        )
    return groups, dropped


def _kept(taint: dict, src) -> bool:
    """Whether ``src`` reaches the value of ``taint`` through a kept path."""
    return src in taint and taint[src].ok


def _coupling(leaves: tuple, out_taint) -> tuple:
    """``[a][c]``: whether leaf ``c``'s old value reaches leaf ``a``'s new one (kept paths).

    The tangents behind ``D`` follow exactly the kept paths, so a ``False`` entry is a
    block of ``D`` that is zero for every input.
    """
    return tuple(tuple(_kept(out_taint[a], ("h", c)) for c in leaves) for a in leaves)


@dataclasses.dataclass(frozen=True)
class _PathFacts:
    """What relation finding reads: the program, its cuts and constants, the reach."""

    program: prog.Program
    cut_nodes: dict
    constants: dict
    out_taint: tuple
    into_etp_x: dict
    batched: bool


def _index_map(facts: _PathFacts, op, g, lead: int):
    """The relation's per-sample index map, or a reason it has none."""
    outputs = [facts.program.outputs[i] for i in g.leaves]
    layers = index_maps.element_positions(
        facts.program, op.node, op.y_index, facts.cut_nodes, facts.constants, outputs
    )
    y_lead = 1 if op.batched else 0
    return index_maps.per_sample_map(layers, tuple(op.y_aval.shape), g.shape, y_lead, lead)


def _relation_for(facts: _PathFacts, op, g, index: int):
    """``(Relation or None, note or None)`` for op ``op`` and group ``g``."""
    reaches = [
        facts.out_taint[i][("y", op.index)]
        for i in g.leaves
        if ("y", op.index) in facts.out_taint[i]
    ]
    if not reaches:
        return None, None
    bad = tuple(sorted(set().union(*(r.bad for r in reaches))))
    if not any(r.ok for r in reaches):
        note = f"reaches group #{g.index} only through {', '.join(bad)} (not position-preserving)"
        return None, note
    lead = 1 if (op.batched or facts.batched) else 0
    y_shape = tuple(op.y_aval.shape)[1 if op.batched else 0 :]
    pos_shape = g.shape[lead:]
    same_batch = not (op.batched and lead) or op.y_aval.shape[0] == g.shape[0]
    mapped = None
    if any(r.moved for r in reaches) or y_shape != pos_shape:
        mapped = _index_map(facts, op, g, lead) if same_batch else "its batch differs"
        if isinstance(mapped, str):
            note = (
                f"output {list(y_shape)} does not map onto group #{g.index}'s positions "
                f"{list(pos_shape)}: {mapped}"
            )
            return None, note
        mapped = tuple(int(v) for v in mapped)
        if mapped == tuple(range(len(mapped))) and y_shape == pos_shape:
            mapped = None  # moved, but back where it started
    note = f"D_f of group #{g.index} drops paths through {', '.join(bad)}" if bad else None
    reached = tuple(_kept(facts.out_taint[i], ("y", op.index)) for i in g.leaves)
    return Relation(index, op.index, g.index, lead, bad, mapped, reached), note


def _find_relations(ops, groups, facts: _PathFacts):
    """Relations (op, group) with position-preserving or index-mapped paths, and op notes."""
    relations, notes = [], {op.index: [] for op in ops}
    for op in ops:
        for g in groups:
            relation, note = _relation_for(facts, op, g, len(relations))
            if relation is not None:
                relations.append(relation)
            if note:
                notes[op.index].append(note)
        into = sorted(facts.into_etp_x.get(("y", op.index), ()))
        if into:
            notes[op.index].append(
                "feeds the input of "
                + ", ".join(f"op #{j}" for j in into)
                + " (cut: ETP outputs are held fixed)"
            )
    return relations, notes


def _self_loop(facts: _PathFacts, taints: dict, op, g, r):
    """``(SelfLoop or None, note or None)``: whether ``r``'s op reads its group per position."""
    if op.x_index is None or registry.is_gradient_enabled(op.primitive):
        return None, None  # no input, or D already follows the path through the op
    atom = facts.program.nodes[op.node].inputs[op.x_index]
    taint = taints.get(atom, {}) if isinstance(atom, int) else {}
    reach = [taint.get(("h", leaf)) for leaf in g.leaves]
    if not any(reach):
        return None, None
    label = f"op #{op.index} reads group #{g.index}, which it drives"
    bad = sorted(set().union(*(x.bad for x in reach if x is not None)))
    if bad:
        return None, f"{label}, through {', '.join(bad)} (not position by position)"
    x_shape = tuple(op.x_aval.shape)[1 if op.batched else 0 :]
    positions = g.shape[r.lead :]
    if x_shape != positions:
        return None, (
            f"{label}, but its input {list(x_shape)} is not laid out like the group's "
            f"positions {list(positions)}"
        )
    index = r.index_map if r.index_map is not None else tuple(range(int(np.prod(positions))))
    reads = tuple(x is not None and x.ok for x in reach)
    return SelfLoop(r.index, op.index, g.index, reads, tuple(index)), None


def _self_loops(facts: _PathFacts, taints: dict, ops, groups, relations) -> tuple:
    """The relations whose op reads its own group position by position, and notes on
    those that read it otherwise (see :class:`~braintrace.compiler.graph.SelfLoop`)."""
    loops, notes = [], []
    for r in relations:
        loop, note = _self_loop(facts, taints, ops[r.op], groups[r.group], r)
        if loop is not None:
            loops.append(loop)
        if note:
            notes.append(note)
    return tuple(loops), tuple(notes)


def _seed_classes(ops, relations) -> tuple:
    """Per op: the tangent class of each output element (``None`` without index maps)."""
    classes = []
    for op in ops:
        maps = [np.asarray(r.index_map) for r in relations if r.op == op.index and r.index_map]
        if not maps:
            classes.append(None)
            continue
        found = index_maps.colour(maps, len(maps[0]))
        classes.append(tuple(int(c) for c in found) if found.max() > 0 else None)
    return tuple(classes)


def _analyse_paths(program, flat: _Flat, ops: list, h_avals: tuple, batched: bool):
    """Kept reach from every float hidden leaf and op output to ``new_hidden``."""
    n_p = flat.n_p
    sources = {program.inputs[n_p + i]: ("h", i) for i, a in enumerate(h_avals) if is_inexact(a)}
    for op in ops:
        sources[program.nodes[op.node].outputs[op.y_index]] = ("y", op.index)
    constants = index_maps.fold_constants(program)
    info = analyse(program, sources, {op.node: op.index for op in ops}, batched, constants)
    out_taint = tuple(
        info.taints.get(a, {}) if isinstance(a, int) else {} for a in program.outputs[: flat.n_h]
    )
    facts = _PathFacts(
        program, dict(info.cut_nodes), constants, out_taint, info.into_etp_x, batched
    )
    return info, facts


def _all_routes(program, flat: _Flat, ops: list, h_avals: tuple):
    """Every route from the float params and hidden leaves (see :mod:`.reach`)."""
    n_p = flat.n_p
    sources = {program.inputs[i]: ("p", i) for i, a in enumerate(flat.p_leaves) if is_inexact(a)}
    sources.update(
        {program.inputs[n_p + i]: ("h", i) for i, a in enumerate(h_avals) if is_inexact(a)}
    )
    return trace_routes(program, sources, {op.node: op.index for op in ops})


def compile_graph(
    step: Callable, params: Any, hidden: Any, x: Any, *, batched: bool = False
) -> ETPGraph:
    """Compile one time step of a model into its eligibility-trace graph.

    Parameters
    ----------
    step : callable
        ``step(params, hidden, x) -> (new_hidden, out)`` over pytrees.
    params, hidden, x : pytree
        Example arguments (arrays or ``jax.ShapeDtypeStruct`` leaves are fine).
    batched : bool
        ``True`` if every leaf of ``hidden`` and ``x`` has a leading batch axis; the
        batch axis is never a position that couples samples.

    Returns
    -------
    ETPGraph

    Raises
    ------
    CompileError
        For a step braintrace cannot compile; the message says how to fix it.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace import ops
    >>> from braintrace.compiler import compile_graph
    >>> def step(p, h, x):
    ...     h = 0.9 * h + ops.dense(x, p['w'])
    ...     return h, h.sum()
    >>> g = compile_graph(step, {'w': jnp.zeros((3, 4))}, jnp.zeros(4), jnp.zeros(3))
    >>> entry = g.report.param("['w']")
    >>> entry.mode, entry.gradient
    ('trace', 'exact')
    """
    flat = _flatten_inputs(params, hidden, x, batched)
    closed, out_def = _trace(step, flat)
    program = prog.flatten(closed)
    _check_no_hidden_etp(program)
    ops = _find_ops(program, flat)
    h_avals = tuple(closed.in_avals[flat.n_p : flat.n_p + flat.n_h])
    info, facts = _analyse_paths(program, flat, ops, h_avals, batched)
    float_h = [i for i, a in enumerate(h_avals) if is_inexact(a)]
    groups, dropped_coupling = _group_hidden(float_h, facts.out_taint, h_avals, flat.h_paths)
    _check_while(program, info.taints, flat, ops)
    relations, op_notes = _find_relations(ops, groups, facts)
    self_loops, loop_notes = _self_loops(facts, info.taints, ops, groups, relations)
    graph = ETPGraph(
        batched=batched,
        ops=tuple(ops),
        groups=tuple(groups),
        relations=tuple(relations),
        report=None,
        program=program,
        cut_nodes=dict(info.cut_nodes),
        params_def=flat.pdef,
        hidden_def=flat.hdef,
        x_def=flat.xdef,
        out_def=out_def,
        hidden_avals=h_avals,
        seed_classes=_seed_classes(ops, relations),
        step=step,
        self_loops=self_loops,
        loop_notes=loop_notes,
    )
    graph.report = build_report(
        Analysis(
            graph=graph,
            param_paths=flat.p_paths,
            param_avals=tuple(closed.in_avals[: flat.n_p]),
            hidden_paths=flat.h_paths,
            op_notes=op_notes,
            dropped_coupling=dropped_coupling,
            out_taint=facts.out_taint,
            routes=_all_routes(program, flat, ops, h_avals),
            control_flow=_control_flow(program, info.taints),
        )
    )
    return graph
