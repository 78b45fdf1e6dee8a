"""Which values reach which, and whether every path is position-preserving.

A *source* is a hidden input leaf ``('h', i)`` or an ETP op output ``('y', k)``.
Each value carries a map ``source -> Reach``: whether some path from the source is
position-preserving (``ok``) and the names of the non-position-preserving
operations on the other paths (``bad``). A node that is not position-preserving
for a tainted operand is a *cut node*: when the compiler computes ``D`` and ``D_f``
it stops the derivative at those operands (only those: another operand's
position-preserving path through the same node is kept), so both keep exactly the
position-preserving paths and the report names what was dropped.

Paths into an ETP op's input ``x`` end there (``D`` and ``D_f`` hold ETP outputs
fixed); they are recorded so the report can say a parameter reaches a hidden state
only through another ETP op.

An ETP output may also reach a group through operations that only move elements
(slices, splits, reshapes, concatenations, transposes, constant-index gathers): such
a path is kept and marked ``moved``, and the compiler then checks with an index map
that every output element reaches at most one position (:mod:`.index_maps`,
``docs/algorithms.md``, "Index maps"). A hidden state's own path through a mover is
cut as before: ``D`` is per position.
"""

from __future__ import annotations

import dataclasses

from .. import registry
from .eqns import sub_jaxprs
from .program import Program, is_inexact

# Operations that map position k of every operand to position k of the result.
ELEMENTWISE = frozenset(
    """
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj copy
    cos cosh digamma div erf erf_inv erfc exp exp2 expm1 floor imag integer_pow
    is_finite lgamma log log1p logistic max min mul ne neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square sub tan tanh xor
    convert_element_type eq ge gt le lt pvary
    """.split()
)
COMPARISONS = frozenset({"eq", "ne", "ge", "gt", "le", "lt"})
WITH_BODY = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "cond"})
LOOPS = frozenset({"scan", "while"})
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "reduce_prod"})
#: Operations that only move the elements of their first operand (concatenate: of
#: every operand); gather and dynamic_slice only with constant indices.
MOVERS = frozenset(
    {
        "slice",
        "split",
        "reshape",
        "squeeze",
        "expand_dims",
        "transpose",
        "concatenate",
        "rev",
        "gather",
        "dynamic_slice",
        "pad",
    }
)
_CONSTANT_INDICES = frozenset({"gather", "dynamic_slice"})


@dataclasses.dataclass(frozen=True)
class Reach:
    """How a source reaches a value: ``ok`` (some kept path), the names of the
    non-position-preserving operations on the others, and whether a kept path moved
    elements (an index map must then check it)."""

    ok: bool
    bad: frozenset = frozenset()
    moved: bool = False

    def merge(self, other: Reach) -> Reach:
        return Reach(self.ok or other.ok, self.bad | other.bad, self.moved or other.moved)

    def broken(self, reason: str) -> Reach:
        return Reach(False, self.bad | {reason}, self.moved)

    def moving(self) -> Reach:
        return Reach(self.ok, self.bad, True)


def merge(*taints: dict) -> dict:
    out: dict = {}
    for taint in taints:
        for src, reach in taint.items():
            out[src] = out[src].merge(reach) if src in out else reach
    return out


def _non_unit(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def _spreads_ok(size_in: int | None, size_out: int, dim: int, batched: bool) -> bool:
    """Whether output axis ``dim`` keeps positions (``size_in`` None: a new axis).

    A value may only be spread along the leading batch axis (one per-sample value
    used by every sample); spreading along any other axis would make one position
    feed several.
    """
    if size_in == size_out or size_out == 1:
        return True
    return batched and dim == 0 and size_in in (None, 1)


def _broadcast_keeps(in_shape, out_shape, batched: bool) -> bool:
    """Numpy-style implicit broadcasting of an operand of an elementwise op."""
    offset = len(out_shape) - len(in_shape)
    if offset < 0:
        return False
    return all(
        _spreads_ok(in_shape[d - offset] if d >= offset else None, size, d, batched)
        for d, size in enumerate(out_shape)
    )


def _structural(prim_name: str, params, in_avals, out_aval, batched: bool) -> list[bool]:
    """For each operand: does this op keep its positions? (shape-level rules)"""
    out_shape = tuple(out_aval.shape)
    if prim_name in ELEMENTWISE:
        return [_broadcast_keeps(tuple(a.shape), out_shape, batched) for a in in_avals]
    if prim_name == "broadcast_in_dim":
        dims = params["broadcast_dimensions"]
        in_shape = tuple(in_avals[0].shape)
        source = {d: in_shape[i] for i, d in enumerate(dims)}
        keeps = all(
            _spreads_ok(source.get(d), size, d, batched) for d, size in enumerate(out_shape)
        )
        return [keeps] + [False] * (len(in_avals) - 1)
    if prim_name in ("reshape", "squeeze", "expand_dims"):
        same = _non_unit(in_avals[0].shape) == _non_unit(out_shape)
        return [same] + [False] * (len(in_avals) - 1)
    if prim_name == "transpose":
        perm = params["permutation"]
        moved = [p for i, p in enumerate(perm) if p != i and in_avals[0].shape[p] != 1]
        return [not moved]
    if prim_name in REDUCTIONS:
        shape = in_avals[0].shape
        return [all(shape[a] == 1 for a in params["axes"])]
    return [False] * len(in_avals)


@dataclasses.dataclass
class PathInfo:
    """Result of the analysis of a program."""

    taints: dict  # value id -> {source: Reach}
    cut_nodes: dict  # node index -> operand positions cut when computing D and D_f
    into_etp_x: dict  # source -> set of op indices whose input x it reaches


def _body_taints(jaxpr, in_taints, batched):
    """Structural analysis of a sub-jaxpr (custom_jvp/vjp body, cond branch).

    Comparisons keep their taint here: a surrogate-gradient spike is a comparison
    in its primal body and a smooth map in its custom derivative.
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    env = {v: t for v, t in zip(inner.invars, in_taints)}

    def read(atom):
        return env.get(atom, {}) if not hasattr(atom, "val") else {}

    for eqn in inner.eqns:
        ins = [read(a) for a in eqn.invars]
        outs = _transfer(eqn, ins, batched, top_level=False)[0]
        for var, t in zip(eqn.outvars, outs):
            env[var] = t
    return [read(a) for a in inner.outvars]


def _body_summary(eqn, operands, batched) -> list:
    """Per result of a cond / custom call: ``{operand index: Reach}`` through its body."""
    bodies = sub_jaxprs(eqn.params)
    skip = 1 if eqn.primitive.name == "cond" else 0
    if skip == 0:
        bodies = bodies[:1]
    summaries = []
    for body in bodies:
        probes = [{i: Reach(True)} if t else {} for i, t in enumerate(operands)][skip:]
        summaries.append(_body_taints(body, probes, batched))
    return [merge(*(s[j] for s in summaries)) for j in range(len(eqn.outvars))]


def _scan_summary(eqn, operands, batched) -> list:
    """Per result of a scan: ``{operand index: Reach}`` over all its iterations.

    The carry is iterated to a fixed point. A per-iteration input (``xs``) reaches
    a result from all its rows and a stacked result (``ys``) spreads over a new
    axis, so neither is position-preserving.
    """
    p = eqn.params
    n_in, n_carry = p["num_consts"] + p["num_carry"], p["num_carry"]
    probes = [{i: Reach(True)} if t else {} for i, t in enumerate(operands)]
    for i in range(n_in, len(operands)):
        probes[i] = {s: r.broken("scan xs") for s, r in probes[i].items()}
    carry_in = probes[p["num_consts"] : n_in]
    while True:
        args = probes[: p["num_consts"]] + carry_in + probes[n_in:]
        outs = _body_taints(p["jaxpr"], args, batched)
        grown = [merge(a, b) for a, b in zip(carry_in, outs[:n_carry])]
        if grown == carry_in:
            break
        carry_in = grown
    ys = [{s: r.broken("scan ys") for s, r in t.items()} for t in outs[n_carry:]]
    return outs[:n_carry] + ys


def _summary(eqn, operands, batched) -> list:
    name = eqn.primitive.name
    if name == "scan":
        return _scan_summary(eqn, operands, batched)
    if name == "while":  # refused on any path by the compiler; here: every path cut
        tainted = {i: Reach(False, frozenset({"while"})) for i, t in enumerate(operands) if t}
        return [dict(tainted) for _ in eqn.outvars]
    return _body_summary(eqn, operands, batched)


def _through_summary(name: str, operands: list, reach: list):
    """Results' taints and cut operands from a summary (an operand with a path that is
    not position-preserving, to any result, is cut as a whole)."""
    cut = frozenset(i for t in reach for i, r in t.items() if r.bad or not r.ok)
    outs = [
        merge(
            *(
                {src: r.broken(name) for src, r in operands[i].items()} if i in cut else operands[i]
                for i in t
            )
        )
        for t in reach
    ]
    return outs, cut


def _movable(name: str, j: int, taint: dict, constant: frozenset, n_operands: int) -> bool:
    """Whether operand ``j`` may pass a mover: only ETP outputs, only its moved operand."""
    if name not in MOVERS or any(src[0] != "y" for src in taint):
        return False
    if name in _CONSTANT_INDICES:
        return j == 0 and all(i in constant for i in range(1, n_operands))
    return name == "concatenate" or j == 0


def _transfer(eqn, in_taints, batched, top_level, constant=frozenset()):
    """Taints of ``eqn``'s results and the operand positions that must be cut.

    ``constant``: the operand positions known to be compile-time constants.
    """
    name = eqn.primitive.name
    in_avals = [a.aval for a in eqn.invars]
    out_avals = [v.aval for v in eqn.outvars]
    n_out = len(out_avals)
    if not any(in_taints):
        return [{} for _ in range(n_out)], frozenset()

    if name in WITH_BODY or name in LOOPS:
        operands = list(in_taints)
        if name == "cond":
            operands[0] = {}  # the branch index carries no derivative
        reach = _summary(eqn, operands, batched)
        return _through_summary(name, operands, reach)

    if name == "stop_gradient":
        return [{} for _ in range(n_out)], frozenset()
    if top_level and name in COMPARISONS:
        return [{} for _ in range(n_out)], frozenset()  # boolean result: no derivative

    if name == "select_n":
        in_taints = [{}] + list(in_taints[1:])  # the predicate carries no derivative
    keeps = _structural(name, eqn.params, in_avals, out_avals[0], batched)
    cut = set()
    per_input = []
    for j, (taint, keep) in enumerate(zip(in_taints, keeps)):
        if taint and not keep and top_level and _movable(name, j, taint, constant, len(in_taints)):
            taint = {s: r.moving() for s, r in taint.items()}
        elif taint and not keep:
            cut.add(j)
            taint = {s: r.broken(name) for s, r in taint.items()}
        per_input.append(taint)
    out = merge(*per_input)
    if top_level and not is_inexact(out_avals[0]):
        out = {}
    return [out] * n_out, frozenset(cut)


def analyse(
    program: Program, sources: dict, etp_nodes: dict, batched: bool, constants: dict
) -> PathInfo:
    """Propagate reach from ``sources`` (value id -> source key) through ``program``.

    ``etp_nodes`` maps node index -> op index for the ETP equations; ``constants``
    maps the value ids computable at compile time to their values.
    """
    taints: dict = {vid: {src: Reach(True)} for vid, src in sources.items()}
    cut_nodes: dict = {}
    into_etp_x: dict = {}

    def read(atom):
        return taints.get(atom, {}) if isinstance(atom, int) else {}

    for index, node in enumerate(program.nodes):
        ins = [read(a) for a in node.inputs]
        if index in etp_nodes:
            prim = node.primitive
            x_index = registry.get_x_invar_index(prim)
            if x_index is not None and ins[x_index]:
                if registry.is_gradient_enabled(prim):
                    outs, cut = _transfer(
                        _ElementwiseView(node.eqn, x_index), [ins[x_index]], batched, True
                    )
                    for vid, t in zip(node.outputs, outs):
                        taints[vid] = merge(taints.get(vid, {}), t)
                    if cut:
                        cut_nodes[index] = frozenset({x_index})
                for src in ins[x_index]:
                    into_etp_x.setdefault(src, set()).add(etp_nodes[index])
            continue  # the op's own output is a source, set above
        constant = frozenset(
            j for j, a in enumerate(node.inputs) if not isinstance(a, int) or a in constants
        )
        outs, cut = _transfer(node.eqn, ins, batched, top_level=True, constant=constant)
        if cut:
            cut_nodes[index] = cut
        for vid, t in zip(node.outputs, outs):
            if t:
                taints[vid] = t
    return PathInfo(taints, cut_nodes, into_etp_x)


class _ElementwiseView:
    """An ETP equation seen as an elementwise map of its input ``x`` (gradient-enabled ops)."""

    class _P:
        name = "add"  # any elementwise primitive name: shape rules only

    def __init__(self, eqn, x_index):
        self.primitive = self._P()
        self.params = {}
        self.invars = [eqn.invars[x_index]]
        self.outvars = list(eqn.outvars)
