"""From one time step to the eligibility-trace graph.

:func:`compile_graph` traces ``step(params, hidden, x) -> (new_hidden, out)``,
finds the ETP ops and the parameters they train, groups the hidden leaves, finds
which op feeds which group through position-preserving paths (the relations), and
returns an :class:`ETPGraph` whose :meth:`ETPGraph.parts` evaluates, for one step,
every op's input ``x``, ``D`` per group and ``D_f`` per relation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import registry
from ..rules import SampleRules
from . import program as prog
from .errors import CompileError
from .paths import analyse
from .report import NONE, ONE_STEP, TRACE, CompileReport, GroupEntry, OpEntry, ParamEntry

__all__ = ["compile_graph", "ETPGraph", "OpInfo", "HiddenGroup", "Relation", "StepParts"]


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One ETP equation of the step."""

    index: int
    primitive: Any
    params: dict  # the equation's keyword parameters
    trainables: dict  # trainable name -> flat params leaf index
    paths: dict  # trainable name -> params path string
    x_index: int | None
    y_index: int
    x_aval: Any
    y_aval: Any
    node: int

    @property
    def rules(self) -> SampleRules:
        return SampleRules(self.primitive, self.params)

    @property
    def batched(self) -> bool:
        return registry.is_batched(self.primitive)

    def sample_vars(self) -> tuple:
        """Per-sample abstract ``x`` (``None`` without an input) and ``y``."""
        strip = 1 if self.batched else 0
        x_var = None
        if self.x_aval is not None:
            x_var = jax.ShapeDtypeStruct(tuple(self.x_aval.shape)[strip:], self.x_aval.dtype)
        y_var = jax.ShapeDtypeStruct(tuple(self.y_aval.shape)[strip:], self.y_aval.dtype)
        return x_var, y_var


@dataclasses.dataclass(frozen=True)
class HiddenGroup:
    """Hidden leaves stacked on a trailing state axis: shape ``(*lead, *positions, S)``."""

    index: int
    leaves: tuple  # flat hidden leaf indices, in state order
    paths: tuple
    shape: tuple  # full leaf shape (batch axis included when batched)
    dtype: Any

    @property
    def num_states(self) -> int:
        return len(self.leaves)


@dataclasses.dataclass(frozen=True)
class Relation:
    """An op whose output reaches a group through position-preserving paths."""

    index: int
    op: int
    group: int
    lead: int  # 1 when the relation is vmapped over a leading (batch) axis
    dropped: tuple = ()  # names of non-position-preserving paths left out of D_f


@dataclasses.dataclass
class StepParts:
    """What one step contributes to the traces.

    ``xs[k]`` is op ``k``'s input (``None`` for ops without one). ``d[g]`` has shape
    ``(*group.shape, S, S)`` with ``d[..., a, c] = dh_a^t / dh_c^{t-1}`` at each
    position; ``df[r]`` has shape ``(*group.shape, S)`` with ``df[..., a] = dh_a^t/dy``.
    """

    new_hidden: Any
    out: Any
    xs: tuple
    d: tuple
    df: tuple


def _path_str(path) -> str:
    """``keystr`` of a leaf path (``''`` for a bare-array tree)."""
    return jax.tree_util.keystr(path)


def _is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


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


@dataclasses.dataclass
class ETPGraph:
    """The compiled eligibility-trace graph of one step function."""

    batched: bool
    ops: tuple
    groups: tuple
    relations: tuple
    report: CompileReport
    program: Any
    cut_nodes: dict  # node index -> operand positions whose derivative is cut
    params_def: Any
    hidden_def: Any
    x_def: Any
    out_def: Any
    hidden_avals: tuple

    @property
    def traced_ops(self) -> tuple:
        """Indices of ops with at least one relation."""
        return tuple(sorted({r.op for r in self.relations}))

    def relations_of(self, op: int) -> tuple:
        return tuple(r for r in self.relations if r.op == op)

    def _flat(self, params, hidden, x) -> list:
        leaves = []
        for name, tree, treedef in (
            ("params", params, self.params_def),
            ("hidden", hidden, self.hidden_def),
            ("x", x, self.x_def),
        ):
            flat, got = jax.tree_util.tree_flatten(tree)
            if got != treedef:
                raise CompileError(
                    f"{name} has structure {got}, but the graph was compiled for {treedef}."
                )
            leaves.extend(flat)
        return leaves

    def evaluate(self, params, hidden, x) -> tuple:
        """Run the step exactly (no derivative cuts): ``(new_hidden, out)``."""
        outs = prog.evaluate(self.program, self._flat(params, hidden, x))
        n = len(self.hidden_avals)
        return (
            jax.tree_util.tree_unflatten(self.hidden_def, outs[:n]),
            jax.tree_util.tree_unflatten(self.out_def, outs[n:]),
        )

    def parts(self, params, hidden, x) -> StepParts:
        """Evaluate one step and its ``x``, ``D`` and ``D_f`` (see :class:`StepParts`).

        ``D`` and ``D_f`` are forward-mode derivatives with every ETP output held
        fixed and non-position-preserving paths cut, computed in one vmapped JVP
        over ``sum_g S_g + #traced ops`` tangent directions.
        """
        flat = self._flat(params, hidden, x)
        n_params = len(jax.tree_util.tree_leaves(params))
        n_hidden = len(self.hidden_avals)
        h_leaves = flat[n_params : n_params + n_hidden]
        float_leaves = [i for i, a in enumerate(self.hidden_avals) if _is_float(a)]
        traced = self.traced_ops
        node_to_op = {op.node: op for op in self.ops}
        perturb_slot = {k: j for j, k in enumerate(traced)}
        y_zeros = [jnp.zeros(self.ops[k].y_aval.shape, self.ops[k].y_aval.dtype) for k in traced]

        def before(index, node, invals):
            cut = self.cut_nodes.get(index)
            if not cut:
                return invals
            return [
                jax.lax.stop_gradient(v) if j in cut and _is_float_value(v) else v
                for j, v in enumerate(invals)
            ]

        def run(h_float, perturbs):
            xs = [None] * len(self.ops)

            def after(index, node, invals, outvals):
                op = node_to_op.get(index)
                if op is None:
                    return outvals
                if op.x_index is not None:
                    xs[op.index] = invals[op.x_index]
                y = outvals[op.y_index]
                if not registry.is_gradient_enabled(op.primitive):
                    y = jax.lax.stop_gradient(y)
                if op.index in perturb_slot:
                    y = y + perturbs[perturb_slot[op.index]]
                outvals[op.y_index] = y
                return outvals

            leaves = list(h_leaves)
            for i, v in zip(float_leaves, h_float):
                leaves[i] = v
            args = flat[:n_params] + leaves + flat[n_params + n_hidden :]
            outs = prog.evaluate(self.program, args, before=before, after=after,
                                 forward_mode=True)
            new_h = outs[:n_hidden]
            return [new_h[i] for i in float_leaves], (new_h, outs[n_hidden:], tuple(xs))

        # Tangent directions: one per state of every group, then one per traced op.
        directions = [("h", g.index, c) for g in self.groups for c in range(g.num_states)]
        directions += [("y", k, 0) for k in traced]
        n_dir = len(directions)
        h_float = [h_leaves[i] for i in float_leaves]
        leaf_pos = {leaf: j for j, leaf in enumerate(float_leaves)}
        h_tan = [jnp.zeros((n_dir,) + v.shape, v.dtype) for v in h_float]
        y_tan = [jnp.zeros((n_dir,) + z.shape, z.dtype) for z in y_zeros]
        for d, (kind, which, c) in enumerate(directions):
            if kind == "h":
                j = leaf_pos[self.groups[which].leaves[c]]
                h_tan[j] = h_tan[j].at[d].set(1)
            else:
                j = perturb_slot[which]
                y_tan[j] = y_tan[j].at[d].set(1)

        if n_dir:
            def jvp_one(ht, yt):
                return jax.jvp(run, (h_float, y_zeros), (ht, yt), has_aux=True)

            _, tangents, aux = jax.vmap(jvp_one, out_axes=(None, 0, None))(h_tan, y_tan)
        else:
            _, aux = run(h_float, y_zeros)
            tangents = []
        new_h, out, xs = aux

        def block(d, group):
            return jnp.stack([tangents[leaf_pos[leaf]][d] for leaf in group.leaves], axis=-1)

        first_dir = {}
        for d, (kind, which, _) in enumerate(directions):
            first_dir.setdefault((kind, which), d)
        d_blocks = tuple(
            jnp.stack([block(first_dir[("h", g.index)] + c, g) for c in range(g.num_states)], -1)
            for g in self.groups
        )
        df = tuple(block(first_dir[("y", r.op)], self.groups[r.group]) for r in self.relations)
        return StepParts(
            new_hidden=jax.tree_util.tree_unflatten(self.hidden_def, new_h),
            out=jax.tree_util.tree_unflatten(self.out_def, out),
            xs=xs,
            d=d_blocks,
            df=df,
        )


def _is_float_value(v) -> bool:
    dtype = getattr(v, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


# -- compile -------------------------------------------------------------------------


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
                paths[name] = p_paths[param_vids[atom]]
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
        ops.append(
            OpInfo(k, prim, dict(node.params), trainables, paths, x_index, y_index, x_aval,
                   y_aval, index)
        )
    return ops


def _dependencies(program, n_p):
    """For each value: the set of params leaves it depends on (any path)."""
    deps: dict = {program.inputs[i]: {i} for i in range(n_p)}
    for node in program.nodes:
        acc = set()
        for a in node.inputs:
            if isinstance(a, int):
                acc |= deps.get(a, set())
        for v in node.outputs:
            deps[v] = acc
    return deps


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
    float_h = [i for i, a in enumerate(h_avals) if _is_float(a)]
    sources = {program.inputs[n_p + i]: ("h", i) for i in float_h}
    for op in ops:
        sources[program.nodes[op.node].outputs[op.y_index]] = ("y", op.index)
    info = analyse(program, sources, {op.node: op.index for op in ops}, batched)
    out_taint = [
        info.taints.get(a, {}) if isinstance(a, int) else {} for a in program.outputs[:n_h]
    ]

    # -- groups: hidden leaves coupled position by position -------------------------
    lead = 1 if batched else 0
    uf = _UnionFind(float_h)
    dropped_coupling: dict = {i: set() for i in float_h}
    for b in float_h:
        for src, reach in out_taint[b].items():
            if src[0] != "h":
                continue
            a = src[1]
            same = h_avals[a].shape == h_avals[b].shape and h_avals[a].dtype == h_avals[b].dtype
            if reach.ok and same:
                uf.union(a, b)
            elif reach.ok:
                dropped_coupling[b].add(f"hidden{h_paths[a]} (different shape or dtype)")
            dropped_coupling[b].update(f"hidden{h_paths[a]} via {p}" for p in sorted(reach.bad))
    members: dict = {}
    for i in float_h:
        members.setdefault(uf.find(i), []).append(i)
    groups = []
    leaf_group = {}
    for root in sorted(members):
        leaves = tuple(members[root])
        g = HiddenGroup(
            len(groups), leaves, tuple(f"hidden{h_paths[i]}" for i in leaves),
            tuple(h_avals[leaves[0]].shape), h_avals[leaves[0]].dtype,
        )
        groups.append(g)
        for i in leaves:
            leaf_group[i] = g.index

    # -- relations ------------------------------------------------------------------
    relations, op_notes = [], {op.index: [] for op in ops}
    for op in ops:
        src = ("y", op.index)
        for g in groups:
            reaches = [out_taint[i][src] for i in g.leaves if src in out_taint[i]]
            if not reaches:
                continue
            ok = any(r.ok for r in reaches)
            bad = tuple(sorted(set().union(*(r.bad for r in reaches))))
            rel_lead = 1 if (op.batched or batched) else 0
            y_shape = tuple(op.y_aval.shape)[1 if op.batched else 0 :]
            pos_shape = g.shape[rel_lead:]
            shapes_ok = y_shape == pos_shape and (
                not (op.batched and rel_lead) or op.y_aval.shape[0] == g.shape[0]
            )
            if ok and shapes_ok:
                relations.append(Relation(len(relations), op.index, g.index, rel_lead, bad))
                if bad:
                    op_notes[op.index].append(
                        f"D_f of group #{g.index} drops paths through {', '.join(bad)}"
                    )
            elif ok:
                op_notes[op.index].append(
                    f"output {list(y_shape)} does not map one-to-one onto group #{g.index}'s "
                    f"positions {list(pos_shape)}"
                )
            else:
                op_notes[op.index].append(
                    f"reaches group #{g.index} only through {', '.join(bad)} "
                    "(not position-preserving)"
                )
        into = sorted(info.into_etp_x.get(src, ()))
        if into:
            op_notes[op.index].append(
                "feeds the input of " + ", ".join(f"op #{j}" for j in into)
                + " (cut: ETP outputs are held fixed)"
            )

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
    graph.report = _build_report(
        graph, program, p_paths, p_leaves, h_paths, h_avals, lead, op_notes, dropped_coupling,
        n_p, n_h, out_taint,
    )
    return graph


def _relation_bytes(graph, relation) -> tuple[int, int]:
    """(D-RTRL, pp_prop output-side) trace bytes of one relation for one sample."""
    op = graph.ops[relation.op]
    g = graph.groups[relation.group]
    x_var, y_var = op.sample_vars()
    w_var = {
        name: jax.ShapeDtypeStruct(graph.program.avals[graph.program.inputs[leaf]].shape,
                                   graph.program.avals[graph.program.inputs[leaf]].dtype)
        for name, leaf in op.trainables.items()
    }
    drtrl = jax.eval_shape(lambda: op.rules.init_drtrl(x_var, y_var, w_var, g.num_states))
    pp = jax.eval_shape(lambda: op.rules.init_pp(x_var, y_var, w_var, g.num_states))
    size = lambda tree: sum(  # noqa: E731
        int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        for a in jax.tree_util.tree_leaves(tree)
    )
    return size(drtrl), (size(pp) if op.x_index is not None else size(drtrl))


def _build_report(graph, program, p_paths, p_leaves, h_paths, h_avals, lead, op_notes,
                  dropped_coupling, n_p, n_h, out_taint):
    deps = _dependencies(program, n_p)
    hidden_out = [a for a in program.outputs[:n_h] if isinstance(a, int)]
    out_out = [a for a in program.outputs[n_h:] if isinstance(a, int)]
    reach_hidden = set().union(*(deps.get(a, set()) for a in hidden_out)) if hidden_out else set()
    reach_out = set().union(*(deps.get(a, set()) for a in out_out)) if out_out else set()

    trace_groups: dict = {}
    trainable_of: dict = {}
    for op in graph.ops:
        groups = [r.group for r in graph.relations_of(op.index)]
        for leaf in op.trainables.values():
            trainable_of.setdefault(leaf, []).append(op.index)
            if groups:
                trace_groups.setdefault(leaf, set()).update(groups)

    entries = []
    for i, path in enumerate(p_paths):
        path = path or "<root>"
        leaf = p_leaves[i]
        shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype).name
        if i in trace_groups:
            entries.append(ParamEntry(path, shape, dtype, TRACE, tuple(sorted(trace_groups[i]))))
        elif i in reach_hidden:
            if i in trainable_of:
                notes = [n for k in trainable_of[i] for n in op_notes[k]]
                reason = "ETP op output has no trace: " + ("; ".join(notes) or "no path")
            else:
                reason = "not routed through an ETP op (plain jnp): one-step-truncated gradient"
            entries.append(ParamEntry(path, shape, dtype, ONE_STEP, (), reason))
        elif i in reach_out:
            entries.append(ParamEntry(path, shape, dtype, ONE_STEP, (),
                                      "readout: reaches no hidden state, gradient is exact"))
        else:
            entries.append(ParamEntry(path, shape, dtype, NONE, (),
                                      "affects neither the hidden state nor the output"))

    group_entries = []
    for g in graph.groups:
        dropped = sorted(set().union(*(dropped_coupling[i] for i in g.leaves)))
        group_entries.append(GroupEntry(g.index, g.paths, g.num_states, g.shape[lead:],
                                        tuple(dropped)))
    ignored = tuple(
        (f"hidden{h_paths[i]}", f"{jnp.dtype(a.dtype).name}: not differentiable, ignored")
        for i, a in enumerate(h_avals) if not _is_float(a)
    )
    op_entries = tuple(
        OpEntry(op.index, op.primitive.name, dict(op.paths),
                tuple(r.group for r in graph.relations_of(op.index)), "; ".join(op_notes[op.index]))
        for op in graph.ops
    )
    drtrl_bytes = pp_bytes = 0
    for r in graph.relations:
        dr, pp = _relation_bytes(graph, r)
        drtrl_bytes += dr
        pp_bytes += pp
    for k in graph.traced_ops:
        x_var, _ = graph.ops[k].sample_vars()
        if x_var is not None:
            pp_bytes += int(np.prod(x_var.shape)) * jnp.dtype(x_var.dtype).itemsize
    warnings = []
    if not graph.ops:
        warnings.append(
            "NO ETP OP FOUND: nothing is trained by eligibility traces; every parameter gets "
            "only its one-step-truncated gradient. Use braintrace ops (or the Flax/Equinox "
            "ETP layers) for the weights that drive the hidden state."
        )
    elif not graph.relations:
        warnings.append(
            "no ETP op reaches a hidden state through a position-preserving path: nothing is "
            "trained by eligibility traces (see the ops' notes)."
        )
    return CompileReport(
        params=tuple(entries),
        groups=tuple(group_entries),
        ops=op_entries,
        ignored_hidden=ignored,
        drtrl_bytes_per_sample=drtrl_bytes,
        pp_bytes_per_sample=pp_bytes,
        warnings=tuple(warnings),
    )
