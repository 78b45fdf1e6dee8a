"""How exact each parameter's gradient is: ``exact``, ``approximate`` or ``truncated``.

The learner's per-step gradient is the exact one-step reverse pass plus the trace
credit ``<dl_t/dh^{t-1}, eps^{t-1}>`` over the parameter's relations (see
``docs/algorithms.md``, "The learning signal" and "D-RTRL"). Its sum over time is
BPTT's gradient exactly when the traces are the true ``dh^{t-1}/dw``, which holds
when, for a parameter ``w`` (section "Exactness classes"):

(a) for each group ``w`` traces, ``D`` is the group's whole state-to-state Jacobian:
    no ETP op that drives the group reads one of its states through its input, and
    no coupling between its states was dropped as non-position-preserving;
(b) no state of those groups reaches another group (``w`` is not in the lower
    layer of a stack);
(c) ``w`` reaches the hidden state only through its ETP ops, whose outputs reach
    it only through the paths ``D_f`` keeps.

A leaf that reaches no hidden state is exact (its one-step gradient is all there
is); a leaf that reaches one but has no relation is truncated (only its one-step
or in-window gradient); every other traced leaf that fails (a), (b) or (c) is
approximate, and the reason names the op, group or equation at fault.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax

from .analysis import Analysis
from .program import is_inexact
from .reach import PLAIN

__all__ = ["EXACT", "APPROXIMATE", "TRUNCATED", "Verdict", "classify"]

EXACT = "exact"
APPROXIMATE = "approximate"
TRUNCATED = "truncated"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The exactness class of one ``params`` leaf, and why.

    ``findings`` holds each reason in full (``reason`` joins them with ``"; "``);
    ``summary`` is one short line of what they say (the report's table shows it).
    """

    gradient: str  # EXACT | APPROXIMATE | TRUNCATED
    reason: str
    reaches_hidden: bool
    reaches_out: bool
    summary: str = ""
    findings: tuple = ()


class Flaw(NamedTuple):
    """One reason a leaf is not exact: ``short`` (a few words, shared by similar flaws)
    and ``text`` (the whole finding, naming the op, group or equation)."""

    short: str
    text: str


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _flawed(gradient: str, flaws: list, reaches_hidden: bool, reaches_out: bool) -> Verdict:
    """The verdict of a leaf with ``flaws``: full findings, and their short forms."""
    texts = tuple(_unique(f.text for f in flaws))
    summary = "; ".join(_unique(f.short for f in flaws))
    return Verdict(gradient, "; ".join(texts), reaches_hidden, reaches_out, summary, texts)


def _ops_short(ops: list) -> str:
    """``op #2`` / ``ops #1, #3 and #5`` / ``ops #1, #3, #5 and 4 more``."""
    if len(ops) == 1:
        return f"op #{ops[0]}"
    if len(ops) <= 3:
        return "ops " + ", ".join(f"#{k}" for k in ops[:-1]) + f" and #{ops[-1]}"
    return "ops " + ", ".join(f"#{k}" for k in ops[:3]) + f" and {len(ops) - 3} more"


# -- names for the reasons ------------------------------------------------------------


def _op_label(a: Analysis, k: int) -> str:
    op = a.graph.ops[k]
    paths = ", ".join(f"params{p}" for p in op.paths.values())
    return f"op #{k} ({op.primitive.name}: {paths})"


# Frames that are not the user's: JAX itself, every braintrace package (the core and
# its faces beside it: ``braintrace/``, ``braintrace_flax/``, ``braintrace_eqx/``, so a
# layer converted by a face's interceptor is reported at the user's call of it), and
# installed packages.
_NOT_USER = (
    os.path.dirname(os.path.abspath(jax.__file__)) + os.sep,
    os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0],  # .../braintrace
)


def _where(eqn) -> str:
    """`` at file:line (function)`` of the user code that made ``eqn`` ('' if unknown).

    The ``braintrace`` entry of ``_NOT_USER`` has no trailing separator on purpose:
    as a prefix it also covers the sibling ``braintrace_flax`` and ``braintrace_eqx``.
    """
    try:  # the traceback JAX keeps on each equation; absent in some versions
        frames = eqn.source_info.traceback.frames
    except AttributeError:
        return ""
    for frame in frames:
        name = os.path.abspath(frame.file_name)
        installed = f"{os.sep}site-packages{os.sep}" in name or "dist-packages" in name
        if not name.startswith(_NOT_USER) and not installed:
            return f" at {os.path.basename(name)}:{frame.line_num} ({frame.function_name})"
    return ""


def _equation(a: Analysis, node: int | None) -> str:
    if node is None:
        return "the step's return value"
    eqn = a.graph.program.nodes[node].eqn
    return f"'{eqn.primitive.name}' (equation #{node}{_where(eqn)})"


# -- (a) and (b): what the groups do ----------------------------------------------------


def _group_flaws(a: Analysis, reach: list, group_of: dict) -> dict:
    """Group index -> reasons its ``D`` is not its whole Jacobian or it feeds another group."""
    flaws: dict = {g.index: [] for g in a.graph.groups}
    recurrent: dict = {g.index: [] for g in a.graph.groups}  # ops reading the group they drive
    for b, sources in enumerate(reach):
        if b not in group_of:
            continue
        gb = group_of[b]
        for src, tags in sources.items():
            if src[0] != "h" or src[1] not in group_of:
                continue
            ga = group_of[src[1]]
            cut = sorted(t for t in tags if t is not PLAIN)
            if ga == gb:
                recurrent[ga].extend(cut)
            else:
                flaws[ga].extend(_stack_flaw(a, ga, gb, j) for j in cut)
            if PLAIN in tags:
                flaws[ga].extend(_plain_state_flaw(a, ga, gb, src[1], b))
    return {g: _recurrence_flaw(a, g, recurrent[g]) + _unique(f) for g, f in flaws.items()}


def _stack_short(ga: int, gb: int) -> str:
    return f"lower layer of a stack (group #{ga} feeds group #{gb})"


def _stack_flaw(a: Analysis, ga: int, gb: int, j: int) -> Flaw:
    """A state of group ``ga`` reaches group ``gb`` through op ``j``'s input (held fixed).

    "op ``j`` of group ``gb``" only when op ``j`` is traced into ``gb`` (as the ops
    table lists it); else the path runs through an op of another group.
    """
    if any(r.group == gb for r in a.graph.relations_of(j)):
        text = f"group #{ga} feeds {_op_label(a, j)} of group #{gb}"
    else:
        text = f"group #{ga} reaches group #{gb} through the input of {_op_label(a, j)}"
    return Flaw(_stack_short(ga, gb), text)


def _recurrence_flaw(a: Analysis, g: int, ops: list) -> list:
    ops = sorted(set(ops))
    if not ops:
        return []
    if len(ops) == 1:
        text = f"{_op_label(a, ops[0])} reads group #{g}, which it drives"
        return [Flaw(f"recurrent ({_ops_short(ops)} reads group #{g})", text)]
    labels = ", ".join(_op_label(a, k) for k in ops[:-1]) + f" and {_op_label(a, ops[-1])}"
    text = f"{labels} read group #{g}, which they drive"
    return [Flaw(f"recurrent ({_ops_short(ops)} read group #{g})", text)]


def _plain_state_flaw(a: Analysis, ga: int, gb: int, leaf_a: int, b: int) -> list:
    """A plain route from a state of group ``ga`` to ``b`` (in ``gb``) that ``D`` lacks."""
    plain = a.out_taint[b].get(("h", leaf_a))
    route = f"{a.hidden_label(leaf_a)} -> {a.hidden_label(b)}"
    if ga != gb:
        via = f" via {', '.join(sorted(plain.bad))}" if plain is not None and plain.bad else ""
        return [Flaw(_stack_short(ga, gb), f"group #{ga} reaches group #{gb} ({route}{via})")]
    if plain is not None and plain.bad:
        text = f"D of group #{ga} drops {route} via {', '.join(sorted(plain.bad))}"
        return [Flaw(f"D of group #{ga} drops a coupling", text)]
    return []


# -- (c): what an op's output does ---------------------------------------------------------


def _op_flaws(a: Analysis, k: int, reach: list, group_of: dict) -> list:
    """Reasons op ``k``'s ``D_f`` misses part of how its output reaches the hidden state."""
    traced = {r.group: r for r in a.graph.relations if r.op == k}
    flaws = [
        Flaw(
            f"D_f of op #{k} drops paths",
            f"D_f of {_op_label(a, k)} into group #{g} drops paths through {', '.join(r.dropped)}",
        )
        for g, r in traced.items()
        if r.dropped
    ]
    for b, sources in enumerate(reach):
        tags = sources.get(("y", k))
        if not tags or b not in group_of:
            continue
        gb = group_of[b]
        for j in sorted(t for t in tags if t is not PLAIN):
            also = "also " if gb in traced else ""
            text = (
                f"{_op_label(a, k)}'s output {also}reaches group #{gb} through the "
                f"input of {_op_label(a, j)}, which is held fixed"
            )
            short = f"output {also}reaches group #{gb} through an op's input (held fixed)"
            flaws.append(Flaw(short, text))
        if PLAIN in tags and gb not in traced:
            how = _untraced_how(a.out_taint[b].get(("y", k)))
            text = f"{_op_label(a, k)}'s output reaches group #{gb} with no trace ({how})"
            flaws.append(Flaw(f"output reaches group #{gb} with no trace", text))
    return list(dict.fromkeys(flaws))


def _untraced_how(plain) -> str:
    """Why a plain route from an op's output to a group gave no relation."""
    if plain is None:
        return "through a call the compiler does not trace into"
    if plain.bad:
        return f"through {', '.join(sorted(plain.bad))}, not position-preserving"
    return "its output does not map one-to-one onto the group's positions"


def _plain_uses(a: Analysis, leaf: int, reach: list) -> dict:
    """Equation (node index) -> hidden leaves a plain use of ``leaf`` reaches."""
    uses: dict = {}
    for b, sources in enumerate(reach):
        for src in sources:
            if src[0] == "p" and src[1] == leaf:
                uses.setdefault(src[2], []).append(b)
    return uses


def _plain_flaws(a: Analysis, leaf: int, uses: dict) -> list:
    return [
        Flaw(
            f"also a plain-jnp path into the state{_where_node(a, node)}",
            f"{a.param_label(leaf)} is also used outside its ETP op: {_equation(a, node)} "
            f"reaches {', '.join(a.hidden_label(b) for b in hidden)} with no trace",
        )
        for node, hidden in sorted(uses.items(), key=lambda kv: (kv[0] is None, kv[0]))
    ]


def _where_node(a: Analysis, node: int | None) -> str:
    """`` at file:line`` of the user's code behind equation ``node`` ('' if unknown)."""
    if node is None:
        return ""
    where = _where(a.graph.program.nodes[node].eqn)
    return where.split(" (")[0] if where else ""


# -- the classes -------------------------------------------------------------------------


def _truncated(a: Analysis, ops: list, uses: dict, reaches_out: bool) -> Verdict:
    """The verdict of a leaf that reaches the hidden state with no trace."""
    parts, shorts = [], []
    for k in ops:
        notes = "; ".join(a.op_notes.get(k, ())) or "no position-preserving path"
        parts.append(f"ETP op output has no trace: {_op_label(a, k)} {notes}")
        shorts.append(f"op #{k}'s output has no trace")
    ordered = sorted(uses.items(), key=lambda kv: (kv[0] is None, kv[0]))
    if uses:
        where = "; ".join(
            f"{_equation(a, node)} reaches " + ", ".join(a.hidden_label(b) for b in hidden)
            for node, hidden in ordered
        )
        parts.append(f"not routed through an ETP op (plain jnp: {where})")
        node = ordered[0][0]
        what = "" if node is None else f" '{a.graph.program.nodes[node].eqn.primitive.name}'"
        shorts.append(f"plain jnp{what}{_where_node(a, node)}")
    reason = "; ".join(parts) + ": only its one-step (or in-window) gradient"
    summary = "no trace: " + "; ".join(_unique(shorts)) + " (one-step gradient only)"
    return Verdict(TRUNCATED, reason, True, reaches_out, summary, tuple(parts))


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What every leaf's verdict reads, computed once per step."""

    reach: list  # per hidden leaf: {source: route tags}
    out: set  # sources that reach the output
    op_flaws: dict  # op index -> reasons (c) fails for its output
    group_flaws: dict  # group index -> reasons (a) or (b) fails


def _reaches(a: Analysis, leaf: int, facts: _Facts):
    """(ops training ``leaf`` that reach a hidden state, plain uses, reaches the output)."""
    ops = [op.index for op in a.graph.ops if leaf in op.trainables.values()]
    ops_to_hidden = [k for k in ops if any(("y", k) in s for s in facts.reach)]
    out = any(s[0] == "p" and s[1] == leaf for s in facts.out) or any(
        ("y", k) in facts.out for k in ops
    )
    return ops, ops_to_hidden, _plain_uses(a, leaf, facts.reach), out


def _verdict(a: Analysis, leaf: int, facts: _Facts) -> Verdict:
    ops, ops_to_hidden, uses, reaches_out = _reaches(a, leaf, facts)
    reaches_hidden = bool(uses or ops_to_hidden)
    if not is_inexact(a.param_avals[leaf]):
        reason = "not a float leaf: it has no gradient"
        return Verdict(EXACT, reason, reaches_hidden, reaches_out, reason, (reason,))
    if not reaches_hidden:
        reason = (
            "readout: reaches no hidden state, so its one-step gradient is exact"
            if reaches_out
            else "reaches neither the hidden state nor the output: its "
            "gradient is zero, which is exact"
        )
        short = "readout" if reaches_out else "reaches neither hidden state nor output"
        return Verdict(EXACT, reason, False, reaches_out, short, (reason,))
    groups = sorted({r.group for r in a.graph.relations if r.op in ops})
    if not groups:
        return _truncated(a, ops_to_hidden, uses, reaches_out)
    flaws = _plain_flaws(a, leaf, uses)
    flaws += [f for k in ops for f in facts.op_flaws[k]]
    flaws += [f for g in groups for f in facts.group_flaws[g]]
    if flaws:
        return _flawed(APPROXIMATE, flaws, True, reaches_out)
    names = ", ".join(f"#{g}" for g in groups)
    reason = f"traced into group {names}: no recurrent op, no feed to another group, no plain path"
    return Verdict(EXACT, reason, True, reaches_out, f"traced into group {names}", (reason,))


def classify(a: Analysis) -> tuple:
    """The :class:`Verdict` of every flat ``params`` leaf, in flat order.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> from braintrace.compiler import compile_graph
    >>> def step(p, h, x):
    ...     h = 0.9 * h + ops.dense(x, p['w'])
    ...     return h, h @ p['r']
    >>> params = {'r': jnp.zeros((4, 2)), 'w': jnp.zeros((3, 4))}
    >>> report = compile_graph(step, params, jnp.zeros(4), jnp.zeros(3)).report
    >>> [(e.path, e.gradient) for e in report.params]
    [("['r']", 'exact'), ("['w']", 'exact')]
    """
    reach = a.hidden_reach()
    group_of = {leaf: g.index for g in a.graph.groups for leaf in g.leaves}
    facts = _Facts(
        reach=reach,
        out=a.out_sources(),
        op_flaws={op.index: _op_flaws(a, op.index, reach, group_of) for op in a.graph.ops},
        group_flaws=_group_flaws(a, reach, group_of),
    )
    return tuple(_verdict(a, i, facts) for i in range(len(a.param_paths)))
