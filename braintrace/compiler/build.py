"""Compile a step function into its eligibility-trace graph.

:func:`compile_graph` traces ``step(params, hidden, x) -> (new_hidden, out)``,
finds the ETP ops and the parameters they train, groups the hidden leaves, finds
which op feeds which group through position-preserving paths (the relations), and
returns an :class:`~braintrace.compiler.graph.ETPGraph` with its report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .. import registry
from . import program as prog
from .errors import CompileError
from .graph import ETPGraph, HiddenGroup, OpInfo, Relation
from .paths import analyse
from .program import is_inexact
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
    return paths, leaves, treedef


def _trace(step, pdef, hdef, xdef, n_p, n_h, h_paths, leaves):
    holder = {}

    def flat_step(*flat):
        params = jax.tree_util.tree_unflatten(pdef, flat[:n_p])
        hidden = jax.tree_util.tree_unflatten(hdef, flat[n_p : n_p + n_h])
        x = jax.tree_util.tree_unflatten(xdef, flat[n_p + n_h :])
        result = step(params, hidden, x)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            kind = "an array" if isinstance(result, jax.Array) else type(result).__name__
            raise CompileError(
                "the step must return (new_hidden, out); got "
                f"{kind}"
                + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
                + "."
            )
        new_hidden, out = result
        new_flat, new_def = jax.tree_util.tree_flatten(new_hidden)
        if new_def != hdef:
            raise CompileError(
                f"the step's new_hidden has structure {new_def} but hidden has {hdef}; "
                "return the same pytree of hidden states it receives."
            )
        out_flat, holder["out_def"] = jax.tree_util.tree_flatten(out)
        return list(new_flat) + list(out_flat)

    closed = jax.make_jaxpr(flat_step)(*leaves)
    out_avals = closed.out_avals
    for i, path in enumerate(h_paths):
        old, new = leaves[n_p + i], out_avals[i]
        if tuple(old.shape) != tuple(new.shape) or jnp.dtype(old.dtype) != jnp.dtype(new.dtype):
            raise CompileError(
                f"hidden{path} changes across the step from {jnp.dtype(old.dtype).name}"
                f"{list(old.shape)} to {jnp.dtype(new.dtype).name}{list(new.shape)}; a hidden "
                "state must keep its shape and dtype (cast or reshape it inside the step)."
            )
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
        for sub in prog.sub_jaxprs(node.params):
            if prog.contains_primitive(sub, registry.is_etp_primitive):
                raise CompileError(
                    f"an ETP op sits inside a '{node.primitive.name}' (a cond branch or a "
                    "custom_jvp/custom_vjp function); the compiler cannot hold its output "
                    "fixed there. Call the ETP op outside it (use jnp.where to select "
                    "between branches)."
                )


def _find_ops(program, n_p, p_paths, h_paths):
    param_vids = {program.inputs[i]: i for i in range(n_p)}
    hidden_vids = {program.inputs[n_p + i]: i for i in range(len(h_paths))}
    ops = []
    for index, node in enumerate(program.nodes):
        prim = node.primitive
        if not registry.is_etp_primitive(prim):
            continue
        k = len(ops)
        label = f"ETP op #{k} ({prim.name})"
        trainables, paths = {}, {}
        for name, invar in registry.get_trainable_invars(prim, node.params).items():
            atom = node.inputs[invar]
            if isinstance(atom, int) and atom in param_vids:
                trainables[name] = param_vids[atom]
                paths[name] = p_paths[param_vids[atom]] or "<root>"
                continue
            if isinstance(atom, prog.Const):
                raise CompileError(
                    f"{label}: its trainable input {name!r} is a constant captured by the step, "
                    "not a params leaf; pass the array in params so it can be trained."
                )
            if isinstance(atom, int) and atom in hidden_vids:
                raise CompileError(
                    f"{label}: its trainable input {name!r} is hidden{h_paths[hidden_vids[atom]]}; "
                    "trainable inputs must be params leaves."
                )
            chain, leaf = _producer_chain(program, atom, param_vids)
            if leaf is None:
                raise CompileError(
                    f"{label}: its trainable input {name!r} is computed inside the step (via "
                    f"{', '.join(reversed(chain)) or 'an input'}), not a params leaf; pass the "
                    "parameter itself to the op."
                )
            raise CompileError(
                f"{label}: params{p_paths[leaf]} reaches its trainable input {name!r} through "
                f"{' -> '.join(reversed(chain))}; ETP ops must receive trainable parameters "
                "unchanged. Pass the raw parameter (use weight_layout='out_in' instead of a "
                "transpose, the op's dtype= instead of a cast) or store the parameter in the "
                "form the op expects."
            )
        x_index = registry.get_x_invar_index(prim)
        y_index = registry.get_y_outvar_index(prim)
        x_aval = None if x_index is None else program.aval_of(node.inputs[x_index])
        y_aval = program.avals[node.outputs[y_index]]
        frozen = {}
        for name, invar in registry.get_frozen_invars(prim, node.params).items():
            atom = node.inputs[invar]
            if isinstance(atom, prog.Const):
                frozen[name] = ("const", atom.value)
            elif isinstance(atom, int) and atom in param_vids:
                frozen[name] = ("param", param_vids[atom])
            else:
                raise CompileError(
                    f"{label}: its frozen operand {name!r} (seen by its trace rules) is "
                    "computed inside the step; it must be a constant or a params leaf, the "
                    "same at every step. Compute it outside the step and close over it."
                )
        ops.append(
            OpInfo(k, prim, dict(node.params), trainables, paths, x_index, y_index, x_aval,
                   y_aval, index, frozen)
        )
    return ops


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
        groups.append(HiddenGroup(
            len(groups), leaves, tuple(f"hidden{h_paths[i]}" for i in leaves),
            tuple(h_avals[leaves[0]].shape), h_avals[leaves[0]].dtype,
        ))
    return groups, dropped


def _find_relations(ops, groups, out_taint, into_etp_x, batched):
    """Relations (op, group) with position-preserving paths, and a note per op."""
    relations, notes = [], {op.index: [] for op in ops}
    for op in ops:
        src = ("y", op.index)
        for g in groups:
            reaches = [out_taint[i][src] for i in g.leaves if src in out_taint[i]]
            if not reaches:
                continue
            ok = any(r.ok for r in reaches)
            bad = tuple(sorted(set().union(*(r.bad for r in reaches))))
            lead = 1 if (op.batched or batched) else 0
            y_shape = tuple(op.y_aval.shape)[1 if op.batched else 0 :]
            pos_shape = g.shape[lead:]
            shapes_ok = y_shape == pos_shape and (
                not (op.batched and lead) or op.y_aval.shape[0] == g.shape[0]
            )
            if ok and shapes_ok:
                relations.append(Relation(len(relations), op.index, g.index, lead, bad))
                if bad:
                    notes[op.index].append(
                        f"D_f of group #{g.index} drops paths through {', '.join(bad)}"
                    )
            elif ok:
                notes[op.index].append(
                    f"output {list(y_shape)} does not map one-to-one onto group #{g.index}'s "
                    f"positions {list(pos_shape)}"
                )
            else:
                notes[op.index].append(
                    f"reaches group #{g.index} only through {', '.join(bad)} "
                    "(not position-preserving)"
                )
        into = sorted(into_etp_x.get(src, ()))
        if into:
            notes[op.index].append(
                "feeds the input of " + ", ".join(f"op #{j}" for j in into)
                + " (cut: ETP outputs are held fixed)"
            )
    return relations, notes


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
    >>> g.report.param("['w']").mode
    'trace'
    """
    p_paths, p_leaves, pdef = _flatten_named("params", params)
    h_paths, h_leaves, hdef = _flatten_named("hidden", hidden)
    x_paths, x_leaves, xdef = _flatten_named("x", x)
    if not h_leaves:
        raise CompileError(
            "hidden has no leaves: there is no state to carry over time, so there is nothing "
            "to learn online. Pass the recurrent state as hidden."
        )
    if batched:
        sizes = {
            (f"hidden{p}" if i < len(h_paths) else f"x{p}"): (leaf.shape[0] if leaf.ndim else None)
            for i, (p, leaf) in enumerate(zip(h_paths + x_paths, h_leaves + x_leaves))
        }
        if len(set(sizes.values())) > 1 or None in sizes.values():
            listed = ", ".join(f"{k}: {v}" for k, v in sizes.items())
            raise CompileError(
                "batched=True needs one leading batch axis of the same size on every leaf of "
                f"hidden and x; got leading sizes {listed}."
            )
    n_p, n_h = len(p_leaves), len(h_leaves)
    closed, out_def = _trace(step, pdef, hdef, xdef, n_p, n_h, h_paths,
                             p_leaves + h_leaves + x_leaves)
    program = prog.flatten(closed)
    _check_no_hidden_etp(program)
    ops = _find_ops(program, n_p, p_paths, h_paths)

    h_avals = tuple(closed.in_avals[n_p : n_p + n_h])
    float_h = [i for i, a in enumerate(h_avals) if is_inexact(a)]
    sources = {program.inputs[n_p + i]: ("h", i) for i in float_h}
    for op in ops:
        sources[program.nodes[op.node].outputs[op.y_index]] = ("y", op.index)
    info = analyse(program, sources, {op.node: op.index for op in ops}, batched)
    out_taint = [
        info.taints.get(a, {}) if isinstance(a, int) else {} for a in program.outputs[:n_h]
    ]

    groups, dropped_coupling = _group_hidden(float_h, out_taint, h_avals, h_paths)
    relations, op_notes = _find_relations(ops, groups, out_taint, info.into_etp_x, batched)

    graph = ETPGraph(
        batched=batched,
        ops=tuple(ops),
        groups=tuple(groups),
        relations=tuple(relations),
        report=None,
        program=program,
        cut_nodes=dict(info.cut_nodes),
        params_def=pdef,
        hidden_def=hdef,
        x_def=xdef,
        out_def=out_def,
        hidden_avals=h_avals,
    )
    graph.report = build_report(
        graph, program, p_paths, p_leaves, h_paths, h_avals, 1 if batched else 0, op_notes,
        dropped_coupling, n_p, n_h, out_taint,
    )
    return graph


