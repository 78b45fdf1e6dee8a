"""Trace a step function and flatten its jaxpr into a list of nodes.

``jax.jit`` / closed calls / ``jax.checkpoint`` are inlined so ETP equations inside a
jitted helper are visible; ``cond`` / ``switch`` are inlined branch by branch and
short loops holding ETP ops unrolled (:mod:`.control_flow`); ``custom_jvp`` /
``custom_vjp`` calls stay single nodes so their custom derivatives (surrogate
spikes) are kept when the program is evaluated. Values are numbered ``0..n``; a
node reads atoms (value ids or constants) and writes value ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.extend import core as jcore

from .. import registry
from . import control_flow
from .eqns import bind, closed_parts, sub_jaxprs
from .errors import CompileError

# Call primitives inlined ("pjit" is jax.jit in older JAX; "remat2" is jax.checkpoint).
INLINED = frozenset({"pjit", "jit", "closed_call", "remat2"})
LOOPS = frozenset({"scan", "while"})  # lax.fori_loop lowers to one of these
# "custom_vjp_call_jaxpr" is the name in older JAX.
CUSTOM_VJP = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})


def is_inexact(value) -> bool:
    """Whether an array, tracer, abstract value or jaxpr variable has an inexact dtype."""
    dtype = getattr(value, "dtype", None)
    if dtype is None and hasattr(value, "aval"):  # a jaxpr variable
        dtype = getattr(value.aval, "dtype", None)
    return dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.inexact)


@dataclasses.dataclass(frozen=True)
class Const:
    """A constant operand (a literal or a value the step closed over)."""

    value: Any


@dataclasses.dataclass
class Node:
    """One equation of the flattened program."""

    eqn: Any  # the jax JaxprEqn (its primitive and params are used to evaluate it)
    inputs: list  # int value ids or Const
    outputs: list[int]

    @property
    def primitive(self):
        return self.eqn.primitive

    @property
    def params(self):
        return self.eqn.params


@dataclasses.dataclass
class Program:
    """A flattened step: inputs are value ids of the flat (params, hidden, x) leaves."""

    nodes: list[Node]
    inputs: list[int]
    outputs: list  # int value ids or Const
    avals: dict[int, Any]  # value id -> ShapedArray
    #: Every cond, switch and loop of the step and how it was handled.
    control: tuple = ()

    def aval_of(self, atom):
        """Abstract value of an atom (a value id or a :class:`Const`)."""
        return _aval_of(atom, self.avals)


def _aval_of(atom, avals: dict):
    if isinstance(atom, Const):
        value = atom.value
        return jax.core.ShapedArray(jax.numpy.shape(value), jax.numpy.result_type(value))
    return avals[atom]


class _Builder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.avals: dict[int, Any] = {}
        self._next = 0
        #: Inside a cond branch: the atom saying whether this branch is taken.
        self.taken = None
        #: Guarded value id -> the raw atom it guards (ETP ops read their trainables raw).
        self.raw: dict = {}
        self.control: list = []

    def new_value(self, aval) -> int:
        vid = self._next
        self._next += 1
        self.avals[vid] = aval
        return vid

    def aval_of(self, atom):
        return _aval_of(atom, self.avals)

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.control)

    def _node(self, eqn, ins) -> list:
        """Append ``eqn`` as a node (an ETP op in a branch: guarded, see control_flow)."""
        in_branch = self.taken is not None and registry.is_etp_primitive(eqn.primitive)
        if in_branch:
            ins = control_flow.etp_in_branch(self, eqn, ins)
        outs = [self.new_value(v.aval) for v in eqn.outvars]
        if eqn.primitive.name in LOOPS:
            self.control.append(
                control_flow.ControlFlow(
                    eqn.primitive.name,
                    f"{control_flow.loop_kind(eqn)} #{self.count(eqn.primitive.name)}",
                    "kept",
                    len(self.nodes),
                )
            )
        self.nodes.append(Node(eqn, ins, outs))
        return [control_flow.guard(self, o) for o in outs] if in_branch else outs

    def _equation(self, eqn, ins) -> list:
        name = eqn.primitive.name
        if name in INLINED:
            sub = sub_jaxprs(eqn.params)[0]
            inner, inner_consts = closed_parts(sub)
            return self.inline(inner, inner_consts, ins)
        if name == "cond":
            return control_flow.inline_cond(self, eqn, ins)
        if name == "scan" and eqn.params["length"] and control_flow.count_etp(eqn.params["jaxpr"]):
            return control_flow.inline_scan(self, eqn, ins)
        if name == "while":
            control_flow.check_while(eqn)
        return self._node(eqn, ins)

    def inline(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(atom):
            if isinstance(atom, jcore.Literal):
                return Const(atom.val)
            return env[atom]

        for var, const in zip(jaxpr.constvars, consts):
            env[var] = Const(const)
        for var, arg in zip(jaxpr.invars, args):
            env[var] = arg
        for eqn in jaxpr.eqns:
            outs = self._equation(eqn, [read(a) for a in eqn.invars])
            for var, out in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = out
        return [read(a) for a in jaxpr.outvars]


def flatten(closed_jaxpr) -> Program:
    """Flatten a ``ClosedJaxpr`` into a :class:`Program`."""
    builder = _Builder()
    jaxpr, consts = closed_parts(closed_jaxpr)
    inputs = [builder.new_value(v.aval) for v in jaxpr.invars]
    outputs = builder.inline(jaxpr, consts, inputs)
    return Program(builder.nodes, inputs, outputs, builder.avals, tuple(builder.control))


def _bind_forward(primitive, params, invals):
    """Bind a ``custom_vjp`` call so that forward mode works through it.

    JAX refuses ``jvp`` of a ``custom_vjp`` function; its JVP is the transpose of
    its (linear) custom VJP, so the custom derivative (a surrogate spike, say) is
    the one ``D`` and ``D_f`` see, as reverse mode would.
    """

    def call(*args):
        return tuple(bind(primitive, params, args))

    fn = jax.custom_jvp(call)

    @fn.defjvp
    def _jvp(primals, tangents):
        outs, vjp_fn = jax.vjp(call, *primals)
        try:
            (t_out,) = jax.linear_transpose(vjp_fn, outs)(tuple(tangents))
        except (NotImplementedError, TypeError, ValueError) as err:
            bwd = getattr(getattr(params.get("bwd"), "f", None), "__name__", "?")
            raise CompileError(
                f"a custom_vjp function (bwd rule {bwd!r}) lies on a path from the hidden "
                "state or an ETP output; D and D_f are forward-mode derivatives and use the "
                "transpose of its bwd rule, which must therefore be linear in the cotangent "
                "(no clipping). "
                f"Use jax.custom_jvp instead. ({type(err).__name__}: {err})"
            ) from err
        return outs, t_out

    return list(fn(*invals))


def evaluate(program: Program, args, *, before=None, after=None, forward_mode=False) -> list:
    """Evaluate ``program`` on flat ``args``.

    ``before(index, node, invals) -> invals`` and ``after(index, node, invals,
    outvals) -> outvals`` may rewrite a node's operands and results (used to cut or
    hold derivatives, and to record an op's input). ``forward_mode=True`` makes
    ``custom_vjp`` calls differentiable by ``jax.jvp`` (see :func:`_bind_forward`).
    """
    env = dict(zip(program.inputs, args))

    def read(atom):
        return atom.value if isinstance(atom, Const) else env[atom]

    for index, node in enumerate(program.nodes):
        invals = [read(a) for a in node.inputs]
        if before is not None:
            invals = before(index, node, invals)
        if forward_mode and node.primitive.name in CUSTOM_VJP:
            outvals = _bind_forward(node.primitive, node.params, invals)
        else:
            outvals = bind(node.primitive, node.params, invals)
        if not node.primitive.multiple_results:
            outvals = [outvals]
        if after is not None:
            outvals = after(index, node, invals, list(outvals))
        env.update(zip(node.outputs, outvals))
    return [read(a) for a in program.outputs]
