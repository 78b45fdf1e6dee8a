"""Which values reach which, by any route, and which ETP op a route crosses first.

:mod:`braintrace.compiler.paths` follows only the routes that ``D`` and ``D_f``
keep (it stops at an ETP op's input, where the op's output is held fixed). To say
how exact a parameter's gradient is, the compiler also needs every other route: a
recurrent weight reads its own group's state through an op's input, a lower layer
reaches an upper layer through the upper layer's input, a parameter is used both by
an ETP op and by plain ``jnp``.

A *source* is ``('p', i, n)`` (float ``params`` leaf ``i`` as read by equation
``n``, so a report can name the equation of a plain use; ``n`` is ``None`` for a
leaf returned as it is), ``('h', i)`` (a float hidden leaf) or ``('y', k)`` (the
output of ETP op ``k``). Each value maps its sources to
the set of *route tags* by which they reach it: ``None`` for a route through plain
operations only, or the index of the first ETP op whose (non-trainable) input the
route passed through. A params leaf entering an op's trainable slot is not
propagated: that route is the source ``('y', k)``. Derivative-free values (integer
or boolean results, ``stop_gradient``) carry nothing, as in reverse mode.
"""

from __future__ import annotations

import dataclasses

from .. import registry
from .program import Program, is_inexact

__all__ = ["Routes", "trace_routes"]

PLAIN = None

# One-operand re-layouts: a params leaf passing through one is still "the leaf", so a
# reason names the equation that uses it (the add of a bias, not its broadcast).
_RELAYOUT = frozenset(
    {
        "convert_element_type",
        "broadcast_in_dim",
        "reshape",
        "squeeze",
        "expand_dims",
        "copy",
        "transpose",
    }
)


@dataclasses.dataclass(frozen=True)
class Routes:
    """Result of :func:`trace_routes`."""

    values: dict  # value id -> {source: frozenset of route tags}

    def of(self, atom) -> dict:
        """The sources of an atom (``{}`` for a constant)."""
        return self.values.get(atom, {}) if isinstance(atom, int) else {}


def _merge(taints) -> dict:
    out: dict = {}
    for taint in taints:
        for src, tags in taint.items():
            out[src] = out[src] | tags if src in out else tags
    return out


def _crossed(taint: dict, op: int) -> dict:
    """The routes of ``taint`` after passing through ETP op ``op``'s input."""
    return {
        src: frozenset(op if tag is PLAIN else tag for tag in tags) for src, tags in taint.items()
    }


def _etp_outputs(node, ins, op: int) -> list:
    """Taints of an ETP equation's results: ``y`` is its own source, plus its inputs' routes."""
    prim = node.primitive
    trainable = set(registry.get_trainable_invars(prim, node.params).values())
    x_index = registry.get_x_invar_index(prim)
    keep_x = registry.is_gradient_enabled(prim)  # identity-like: the x route is evaluated
    passed = [
        taint if (j == x_index and keep_x) else _crossed(taint, op)
        for j, taint in enumerate(ins)
        if j not in trainable
    ]
    y_index = registry.get_y_outvar_index(prim)
    rest = _merge(passed)
    outs = [dict(rest) for _ in node.outputs]
    outs[y_index] = _merge([rest, {("y", op): frozenset({PLAIN})}])
    return outs


def trace_routes(program: Program, sources: dict, etp_nodes: dict) -> Routes:
    """Propagate every source through ``program`` by any route.

    Parameters
    ----------
    program : Program
        The flattened step.
    sources : dict
        Value id -> source key: ``('p', i)`` for a params leaf (split per reading
        equation here) or ``('h', i)``; op outputs are added here.
    etp_nodes : dict
        Node index -> ETP op index.

    Returns
    -------
    Routes
    """
    values: dict = {
        vid: {(src + (None,) if src[0] == "p" else src): frozenset({PLAIN})}
        for vid, src in sources.items()
    }
    param_of = {vid: src[1] for vid, src in sources.items() if src[0] == "p"}
    for index, node in enumerate(program.nodes):
        if _relayout_of_param(node, param_of):
            leaf = param_of[node.inputs[0]]
            param_of[node.outputs[0]] = leaf  # a reason names the next equation
            values[node.outputs[0]] = {("p", leaf, None): frozenset({PLAIN})}
            continue
        ins = [_read(values, param_of, atom, index) for atom in node.inputs]
        if index in etp_nodes:
            outs = _etp_outputs(node, ins, etp_nodes[index])
        elif node.primitive.name == "stop_gradient":
            outs = [{} for _ in node.outputs]
        else:
            outs = [_merge(ins)] * len(node.outputs)
        for vid, taint in zip(node.outputs, outs):
            if taint and is_inexact(program.avals[vid]):
                values[vid] = taint
    return Routes(values)


def _relayout_of_param(node, param_of: dict) -> bool:
    return (
        node.primitive.name in _RELAYOUT
        and len(node.inputs) == 1
        and len(node.outputs) == 1
        and isinstance(node.inputs[0], int)
        and node.inputs[0] in param_of
    )


def _read(values: dict, param_of: dict, atom, index: int) -> dict:
    """An operand's taint; a params leaf is tagged with the equation reading it."""
    if not isinstance(atom, int):
        return {}
    if atom in param_of:
        return {("p", param_of[atom], index): frozenset({PLAIN})}
    return values.get(atom, {})
