"""The compile report: how every parameter will be trained, and why.

``str(report)`` is the plain-text table a user prints first when something does
not learn; the dataclasses are the structured form tests read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .program import is_inexact

TRACE = "trace"
ONE_STEP = "one-step"
NONE = "none"


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """How one ``params`` leaf is trained."""

    path: str
    shape: tuple
    dtype: str
    mode: str  # 'trace' | 'one-step' | 'none'
    groups: tuple = ()  # hidden groups whose traces train it (mode 'trace')
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class GroupEntry:
    """One hidden group."""

    index: int
    leaves: tuple
    num_states: int
    position_shape: tuple
    dropped: tuple = ()  # non-position-preserving couplings left out of D


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """One ETP op and the groups it has a trace for."""

    index: int
    primitive: str
    trainables: dict
    groups: tuple
    note: str = ""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Structured compile report; ``str()`` gives the table."""

    params: tuple
    groups: tuple
    ops: tuple
    ignored_hidden: tuple  # (path, reason)
    drtrl_bytes_per_sample: int
    pp_bytes_per_sample: int
    warnings: tuple = ()

    def param(self, path: str) -> ParamEntry:
        """The entry of the parameter whose path is ``path`` (e.g. ``"['w']"``)."""
        for entry in self.params:
            if entry.path == path:
                return entry
        known = [p.path for p in self.params]
        raise KeyError(f"no parameter {path!r} in the report; known: {known}")

    def __str__(self) -> str:
        lines = ["braintrace compile report", "=" * 25]
        for warning in self.warnings:
            lines.append(f"!! {warning}")
        lines.append("")
        lines.append("parameters")
        rows = [("path", "shape", "mode", "detail")]
        for p in self.params:
            detail = ("groups " + ", ".join(f"#{g}" for g in p.groups)) if p.groups else ""
            if p.reason:
                detail = f"{detail}; {p.reason}" if detail else p.reason
            rows.append((p.path, f"{p.dtype}{list(p.shape)}", p.mode, detail))
        lines.extend(_table(rows))
        lines.append("")
        lines.append("hidden groups")
        rows = [("group", "leaves", "S", "positions", "note")]
        for g in self.groups:
            note = ("D drops: " + "; ".join(g.dropped)) if g.dropped else ""
            rows.append((f"#{g.index}", ", ".join(g.leaves), str(g.num_states),
                         str(tuple(g.position_shape)), note))
        for path, reason in self.ignored_hidden:
            rows.append(("-", path, "-", "-", reason))
        lines.extend(_table(rows))
        lines.append("")
        lines.append("ETP ops")
        rows = [("op", "primitive", "trainables", "trace groups", "note")]
        for op in self.ops:
            trainables = ", ".join(f"{k}={v}" for k, v in op.trainables.items())
            groups = ", ".join(f"#{g}" for g in op.groups) or "-"
            rows.append((f"#{op.index}", op.primitive, trainables, groups, op.note))
        lines.extend(_table(rows))
        lines.append("")
        lines.append(
            f"trace memory per sample: D-RTRL {_bytes(self.drtrl_bytes_per_sample)}, "
            f"pp_prop {_bytes(self.pp_bytes_per_sample)}"
        )
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


# -- building the report from a compiled graph -------------------------------------


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


def build_report(graph, program, p_paths, p_leaves, h_paths, h_avals, lead, op_notes,
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
        for i, a in enumerate(h_avals) if not is_inexact(a)
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
