"""The compile report: how every parameter will be trained, and how exact that is.

``str(report)`` is the plain-text table a user prints first when something does
not learn; the dataclasses are the structured form tests read. Each parameter has
a *mode* (``trace``: eligibility traces; ``one-step``: only the one-step reverse
pass; ``none``: it affects nothing) and a *gradient* class (``exact``,
``approximate``, ``truncated``; see ``docs/algorithms.md``, "Exactness classes").
"""

from __future__ import annotations

import dataclasses
import textwrap

import jax.numpy as jnp

from .analysis import Analysis
from .exactness import APPROXIMATE, EXACT, TRUNCATED, Verdict, classify
from .program import is_inexact

__all__ = [
    "TRACE",
    "ONE_STEP",
    "NONE",
    "EXACT",
    "APPROXIMATE",
    "TRUNCATED",
    "ParamEntry",
    "GroupEntry",
    "OpEntry",
    "CompileReport",
    "Explanation",
    "build_report",
]

TRACE = "trace"
ONE_STEP = "one-step"
NONE = "none"


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """How one ``params`` leaf is trained, and how exact its gradient is.

    Attributes
    ----------
    path : str
        ``keystr`` of the leaf, e.g. ``"['cell']['kernel']"``.
    shape : tuple
    dtype : str
    mode : str
        ``'trace'`` (eligibility traces), ``'one-step'`` (only the one-step
        reverse pass) or ``'none'`` (it affects neither hidden state nor output).
    gradient : str
        ``'exact'``, ``'approximate'`` or ``'truncated'`` (D-RTRL's summed gradient
        against BPTT; see ``docs/algorithms.md``, "Exactness classes").
    groups : tuple
        Hidden groups whose traces train it (mode ``'trace'``).
    reason : str
        Why it is in its class, in full: every finding, naming the op, group or
        equation at fault (``"; "``-separated; ``findings`` holds them one by one).
    reaches_hidden : bool
        Whether the leaf reaches a hidden state by any route (the leaves RTRL and
        UORO keep an influence for).
    """

    path: str
    shape: tuple
    dtype: str
    mode: str
    gradient: str
    groups: tuple = ()
    reason: str = ""
    reaches_hidden: bool = False
    summary: str = ""
    findings: tuple = ()

    @property
    def short(self) -> str:
        """One line of why it is in its class (the report's table shows it)."""
        return self.summary or self.reason


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
    """Structured compile report; ``str()`` gives the table.

    ``trace_memory`` holds ``(algorithm name, bytes per sample)`` pairs; the
    compiler leaves it empty and a learner fills it in for its algorithm
    (``dataclasses.replace``), since trace memory belongs to the algorithm.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> from braintrace.compiler import compile_graph
    >>> def step(p, h, x):
    ...     h = 0.9 * h + ops.dense(jnp.tanh(x @ p['win']), p['w'])
    ...     return h, h.sum()
    >>> params = {'w': jnp.zeros((3, 4)), 'win': jnp.zeros((2, 3))}
    >>> report = compile_graph(step, params, jnp.zeros(4), jnp.zeros(2)).report
    >>> report.param("['w']").gradient, report.param("['win']").gradient
    ('exact', 'truncated')
    >>> [e.path for e in report.truncated]
    ["['win']"]
    """

    params: tuple
    groups: tuple
    ops: tuple
    ignored_hidden: tuple  # (path, reason)
    warnings: tuple = ()
    trace_memory: tuple = ()  # (algorithm name, bytes per sample)
    #: ``(op index, bytes per sample)`` of the learner's algorithm, for the ops whose
    #: traces it keeps per op (filled in by a learner, as ``trace_memory``).
    op_trace_memory: tuple = ()
    #: ``(label, handling, note)`` per cond, switch and loop of the step
    #: (``docs/algorithms.md``, "Control flow").
    control_flow: tuple = ()

    def param(self, path: str) -> ParamEntry:
        """The entry of the parameter whose path is ``path`` (e.g. ``"['w']"``).

        ``.short`` is the one line the table shows; ``.reason`` the whole story.
        """
        for entry in self.params:
            if entry.path == path:
                return entry
        known = [p.path for p in self.params]
        raise KeyError(f"no parameter {path!r} in the report; known: {known}")

    def explain(self, path: str) -> Explanation:
        """Why the parameter at ``path`` is trained as it is, in full: ``str()`` of the
        result lists every finding on its own line (the table shows one short line).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from braintrace import ops
        >>> from braintrace.compiler import compile_graph
        >>> def step(p, h, x):
        ...     h = jnp.tanh(ops.dense(x, p['w']) + ops.dense(h, p['u']))
        ...     return h, h
        >>> f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
        >>> params = {'u': f32(4, 4), 'w': f32(3, 4)}
        >>> report = compile_graph(step, params, f32(4), f32(3)).report
        >>> report.param("['w']").short
        'recurrent (op #1 reads group #0)'
        >>> print(report.explain("['w']"))
        params['w'] float32[3, 4]: trace (groups #0), approximate
          in short: recurrent (op #1 reads group #0)
          - op #1 (etp_mv: params['u']) reads group #0, which it drives
        """
        return Explanation(self.param(path))

    @property
    def truncated(self) -> tuple:
        """The entries whose gradient is ``'truncated'``."""
        return tuple(p for p in self.params if p.gradient == TRUNCATED)

    def retrained(self, mode: str, gradient: str, reason: str, groups: tuple = ()) -> CompileReport:
        """This report as another algorithm trains it: every leaf that reaches the hidden
        state gets ``mode``, ``gradient`` and ``reason`` (the others keep theirs), and
        the warnings about D-RTRL's traces are dropped.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> from braintrace import ops
        >>> from braintrace.compiler import compile_graph
        >>> def step(p, h, x):
        ...     return jnp.tanh(x @ p['w'] + h), h
        >>> report = compile_graph(step, {'w': jnp.zeros((3, 4))}, jnp.zeros(4),
        ...                        jnp.zeros(3)).report
        >>> report.param("['w']").gradient, bool(report.warnings)
        ('truncated', True)
        >>> rtrl = report.retrained("trace", "exact", "every path counts")
        >>> rtrl.param("['w']").gradient, rtrl.param("['w']").short, rtrl.warnings
        ('exact', 'every path counts', ())
        """
        changed = dict(mode=mode, gradient=gradient, reason=reason, groups=groups)
        changed.update(summary=reason, findings=(reason,))
        params = tuple(
            dataclasses.replace(p, **changed) if p.reaches_hidden else p for p in self.params
        )
        return dataclasses.replace(self, params=params, warnings=())

    def truncation_message(self) -> str | None:
        """One text naming every truncated leaf and why (``None`` when there is none)."""
        truncated = self.truncated
        if not truncated:
            return None
        lead = ""
        if not self.ops:
            lead = "the step has no ETP op, so nothing is trained by eligibility traces. "
        count = (
            "1 parameter leaf reaches the hidden state but has"
            if len(truncated) == 1
            else f"{len(truncated)} parameter leaves reach the hidden state but have"
        )
        lines = [
            f"braintrace: {lead}{count} no eligibility trace; each gets only its one-step "
            "(or in-window) gradient:"
        ]
        lines += [
            f"  {_param_label(p.path)} {p.dtype}{list(p.shape)}: {p.reason}" for p in truncated
        ]
        lines.append(
            "To credit them across steps, train in windows of k steps "
            "(learner.scan(..., window=k)) or make the layer an ETP layer whose output drives "
            "the hidden state (docs/algorithms.md, 'Exactness classes')."
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = ["braintrace compile report", "=" * 25]
        for warning in self.warnings:
            lines += textwrap.wrap(warning, WIDTH, initial_indent="!! ", subsequent_indent="   ")
        for title, rows in (
            ("parameters", _param_rows(self.params)),
            ("hidden groups", _group_rows(self.groups, self.ignored_hidden)),
            ("ETP ops", _op_rows(self.ops, dict(self.op_trace_memory))),
            ("control flow", _control_rows(self.control_flow)),
        ):
            if title == "control flow" and not self.control_flow:
                continue
            lines += ["", title] + _table(rows, wrap=(2, -1) if title == "ETP ops" else (-1,))
        if self.trace_memory:
            listed = ", ".join(f"{name} {_bytes(n)}" for name, n in self.trace_memory)
            lines += ["", f"trace memory per sample: {listed}"]
        return "\n".join(lines)


def _control_rows(control_flow: tuple) -> list:
    return [("node", "handling", "note")] + [tuple(row) for row in control_flow]


def _param_label(path: str) -> str:
    return "params" if path == "<root>" else f"params{path}"


def _param_rows(params) -> list:
    rows = [("path", "shape", "mode", "gradient", "detail")]
    for p in params:
        detail = ("groups " + ", ".join(f"#{g}" for g in p.groups)) if p.groups else ""
        if p.short:
            detail = f"{detail}; {p.short}" if detail else p.short
        rows.append((p.path, f"{p.dtype}{list(p.shape)}", p.mode, p.gradient, detail))
    return rows


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The long form of one parameter's entry (:meth:`CompileReport.explain`)."""

    entry: ParamEntry

    def __str__(self) -> str:
        e = self.entry
        groups = f" (groups {', '.join(f'#{g}' for g in e.groups)})" if e.groups else ""
        lines = [f"{_param_label(e.path)} {e.dtype}{list(e.shape)}: {e.mode}{groups}, {e.gradient}"]
        lines.append(f"  in short: {e.short}")
        for finding in e.findings or (e.reason,):
            lines += textwrap.wrap(finding, WIDTH, initial_indent="  - ", subsequent_indent="    ")
        return "\n".join(lines)


def _group_rows(groups, ignored_hidden) -> list:
    rows = [("group", "leaves", "S", "positions", "note")]
    for g in groups:
        note = ("D drops: " + "; ".join(g.dropped)) if g.dropped else ""
        rows.append(
            (
                f"#{g.index}",
                ", ".join(g.leaves),
                str(g.num_states),
                str(tuple(g.position_shape)),
                note,
            )
        )
    rows += [("-", path, "-", "-", reason) for path, reason in ignored_hidden]
    return rows


def _op_rows(ops, op_bytes: dict) -> list:
    rows = [("op", "primitive", "trainables", "trace groups", "trace/sample", "note")]
    for op in ops:
        trainables = ", ".join(f"{k}={v}" for k, v in op.trainables.items())
        groups = ", ".join(f"#{g}" for g in op.groups) or "-"
        size = _bytes(op_bytes[op.index]) if op.index in op_bytes else "-"
        rows.append((f"#{op.index}", op.primitive, trainables, groups, size, op.note))
    if not op_bytes:
        rows = [row[:4] + row[5:] for row in rows]
    return rows


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


#: The report's lines fit this many columns (the last column of a table wraps).
WIDTH = 120


def _table(rows, wrap: tuple = (-1,)) -> list[str]:
    """Aligned columns fitting ``WIDTH``: the ``wrap`` columns (default the last) share
    what the others leave and wrap onto continuation lines."""
    n = len(rows[0])
    wrap = {i % n for i in wrap}
    widths = [max(len(str(r[i])) for r in rows) for i in range(n)]
    budget = WIDTH - 2 * n - sum(w for i, w in enumerate(widths) if i not in wrap)
    natural = sum(widths[i] for i in wrap)
    if natural > budget:
        for i in wrap:
            longest = max(len(word) for r in rows for word in str(r[i]).split() or [""])
            widths[i] = max(16, min(longest, widths[i]), budget * widths[i] // natural)
    out = []
    for j, row in enumerate(rows):
        cells = [
            textwrap.wrap(str(c), widths[i], break_on_hyphens=False) or [""]
            if i in wrap
            else [str(c)]
            for i, c in enumerate(row)
        ]
        for k in range(max(len(c) for c in cells)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            out.append(("  " + "  ".join(parts)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


# -- building the report from the compiler's analysis ----------------------------------------


def _param_entry(a: Analysis, leaf: int, verdict: Verdict, groups: tuple) -> ParamEntry:
    aval = a.param_avals[leaf]
    if groups:
        mode = TRACE
    elif verdict.reaches_hidden or verdict.reaches_out:
        mode = ONE_STEP
    else:
        mode = NONE
    return ParamEntry(
        path=a.param_paths[leaf] or "<root>",
        shape=tuple(aval.shape),
        dtype=jnp.dtype(aval.dtype).name,
        mode=mode,
        gradient=verdict.gradient,
        groups=groups,
        reason=verdict.reason,
        reaches_hidden=verdict.reaches_hidden,
        summary=verdict.summary,
        findings=verdict.findings,
    )


def _param_entries(a: Analysis) -> tuple:
    trace_groups: dict = {}
    for r in a.graph.relations:
        for leaf in a.graph.ops[r.op].trainables.values():
            trace_groups.setdefault(leaf, set()).add(r.group)
    return tuple(
        _param_entry(a, leaf, verdict, tuple(sorted(trace_groups.get(leaf, ()))))
        for leaf, verdict in enumerate(classify(a))
    )


def _group_entries(a: Analysis) -> tuple:
    graph = a.graph
    lead = 1 if graph.batched else 0
    return tuple(
        GroupEntry(
            g.index,
            g.paths,
            g.num_states,
            g.shape[lead:],
            tuple(sorted(set().union(*(a.dropped_coupling[i] for i in g.leaves)))),
        )
        for g in graph.groups
    )


def _op_entries(a: Analysis) -> tuple:
    graph = a.graph
    return tuple(
        OpEntry(
            op.index,
            op.primitive.name,
            dict(op.paths),
            tuple(r.group for r in graph.relations_of(op.index)),
            "; ".join(a.op_notes[op.index]),
        )
        for op in graph.ops
    )


def _warnings(a: Analysis) -> tuple:
    if not a.graph.ops:
        return (
            "NO ETP OP FOUND: nothing is trained by eligibility traces; every parameter that "
            "reaches the hidden state gets only its one-step-truncated gradient. Use braintrace "
            "ops (or the Flax/Equinox ETP layers) for the weights that drive the hidden state.",
        )
    if not a.graph.relations:
        return (
            "no ETP op reaches a hidden state through a position-preserving path: nothing is "
            "trained by eligibility traces (see the ops' notes).",
        )
    return ()


def build_report(analysis: Analysis) -> CompileReport:
    """The :class:`CompileReport` of a compiled step (made by ``compile_graph``)."""
    ignored = tuple(
        (analysis.hidden_label(i), f"{jnp.dtype(a.dtype).name}: not differentiable, ignored")
        for i, a in enumerate(analysis.graph.hidden_avals)
        if not is_inexact(a)
    )
    return CompileReport(
        params=_param_entries(analysis),
        groups=_group_entries(analysis),
        ops=_op_entries(analysis),
        ignored_hidden=ignored,
        warnings=_warnings(analysis),
        control_flow=analysis.control_flow,
    )
