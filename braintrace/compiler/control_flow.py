"""Control flow inside a step: how ``cond``, ``switch`` and loops reach the flat program.

``docs/algorithms.md``, "Control flow", has the math; in short:

- ``lax.cond`` / ``lax.switch``: every branch is inlined on *guarded* operands and
  the results are merged by ``select_n`` on the branch index, as JAX itself runs a
  ``cond`` whose predicate is batched. A guard ``select_n(taken, stop_gradient(a), a)``
  sends whatever a branch not taken computes in the reverse pass (a ``0 * inf``,
  say) into the ``stop_gradient`` side, so it never reaches a gradient (the
  ``where`` trap). An ETP op in a branch reads its trainables unguarded (they must
  be the raw parameters), so its own input is zeroed and its output guarded where
  the branch is not taken: its ``x``, ``D_f`` and weight cotangent are then exactly
  zero for a sample that takes another branch. The program is straight-line code
  afterwards, and every analysis (paths, index maps, exactness) applies unchanged.
- ``lax.scan`` / ``lax.fori_loop`` holding ETP ops whose inputs are the same at
  every iteration (the loop's constants): those ops are moved before the loop and
  the loop is kept (any length; one trace per op). Otherwise, with at most
  :data:`UNROLL_MAX` iterations: unrolled (one op per iteration, each traced).
- Any other loop stays one node; the compiler composes ``D`` and ``D_f`` through
  it by forward mode when hidden state or an ETP output passes through it (a scan),
  and refuses a ``while`` loop on such a path (it has no reverse mode).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

from .. import registry
from . import eqns
from .errors import CompileError

__all__ = ["ControlFlow", "UNROLL_MAX", "inline_cond", "inline_scan", "loop_kind"]

#: Loops holding ETP ops are unrolled up to this many iterations. Each iteration's
#: op is then an op of its own with its own trace, so memory grows with the count;
#: past 16 sub-steps that cost (and the compile time of an unrolled body) is better
#: spent by computing the op's output once, before the loop (see the error).
UNROLL_MAX = 16


@dataclasses.dataclass(frozen=True)
class ControlFlow:
    """One control-flow construct of the step and what the compiler did with it.

    ``handling`` is ``'inlined'`` (cond/switch), ``'unrolled'`` (a short loop with
    ETP ops) or ``'kept'`` (one node, index ``node``; the compiler later calls it
    ``'composed'`` or ``'opaque'``).
    """

    kind: str
    label: str
    handling: str
    node: int | None = None
    etp_ops: int = 0
    #: ETP ops moved out of a kept loop (their inputs are the same every iteration).
    hoisted: int = 0


def _is_etp(prim) -> bool:
    return registry.is_etp_primitive(prim)


def _etp_in(jaxpr) -> list:
    """The ETP equations of ``jaxpr``, those in its nested jaxprs included."""
    inner, _ = eqns.closed_parts(jaxpr)
    return [found for e in inner.eqns for found in ([e] if _is_etp(e.primitive) else _etp_eqns(e))]


def _etp_eqns(eqn) -> list:
    """The ETP equations anywhere inside ``eqn``'s sub-jaxprs."""
    return [found for sub in eqns.sub_jaxprs(eqn.params) for found in _etp_in(sub)]


def count_etp(jaxpr) -> int:
    """ETP equations in ``jaxpr`` and its sub-jaxprs."""
    return len(_etp_in(jaxpr))


def loop_kind(eqn) -> str:
    """``'scan of length N'`` or ``'while loop'`` (for messages)."""
    if eqn.primitive.name == "scan":
        return f"scan of length {eqn.params['length']}"
    return "while loop"


# -- small equations, emitted through the builder ----------------------------------------


def emit(builder, fn, *atoms) -> list:
    """Trace ``fn`` on the atoms' shapes and inline its equations; its result atoms."""
    structs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
        for a in map(builder.aval_of, atoms)
    ]
    closed = jax.make_jaxpr(fn)(*structs)
    return builder.inline(closed.jaxpr, closed.consts, list(atoms))


def _guard(taken, a):
    return lax.select_n(taken, lax.stop_gradient(a), a)


def _zero_unless(taken, a):
    return lax.select_n(taken, jnp.zeros_like(a), a)


def _is_branch(index, b: int):
    return index == b


def _merge(index, *cases):
    return lax.select_n(index, *cases)


def _take(a, k: int):
    return a[k]


def _stack(*slices):
    return jnp.stack(slices)


def _inexact(builder, atom) -> bool:
    return jnp.issubdtype(builder.aval_of(atom).dtype, jnp.inexact)


def guard(builder, atom):
    """``atom`` seen inside the current branch: no cotangent where it is not taken."""
    if builder.taken is None or not _inexact(builder, atom):
        return atom
    (out,) = emit(builder, _guard, builder.taken, atom)
    builder.raw[out] = builder.raw.get(atom, atom)
    return out


# -- cond / switch ----------------------------------------------------------------------


def inline_cond(builder, eqn, ins: list) -> list:
    """Inline every branch of a ``cond`` on guarded operands; merge by the index."""
    index, operands = ins[0], ins[1:]
    n = len(eqn.params["branches"])
    etp = sum(count_etp(b) for b in eqn.params["branches"])
    label = f"cond #{builder.count('cond')} ({n} branches)"  # numbered before nested ones
    builder.control.append(ControlFlow("cond", label, "inlined", None, etp))
    outer = builder.taken
    per_branch = []
    for b, branch in enumerate(eqn.params["branches"]):
        (taken,) = emit(builder, functools.partial(_is_branch, b=b), index)
        if outer is not None:
            (taken,) = emit(builder, jnp.logical_and, outer, taken)
        builder.taken = taken
        try:
            guarded = [guard(builder, a) for a in operands]
            per_branch.append(builder.inline(branch.jaxpr, branch.consts, guarded))
        finally:
            builder.taken = outer
    merged = [
        emit(builder, _merge, index, *(outs[j] for outs in per_branch))[0]
        for j in range(len(eqn.outvars))
    ]
    return merged


def etp_in_branch(builder, eqn, ins: list) -> list:
    """An ETP equation's operands inside a branch: raw trainables, input zeroed if not taken."""
    prim, params = eqn.primitive, eqn.params
    ins = list(ins)
    slots = list(registry.get_trainable_invars(prim, params).values())
    slots += list(registry.get_frozen_invars(prim, params).values())
    for j in slots:
        ins[j] = builder.raw.get(ins[j], ins[j])
    x_index = registry.get_x_invar_index(prim)
    if x_index is not None:
        (ins[x_index],) = emit(builder, _zero_unless, builder.taken, ins[x_index])
    return ins


# -- loops ------------------------------------------------------------------------------


def _refuse_loop(eqn, why: str) -> CompileError:
    names = sorted({e.primitive.name for e in _etp_eqns(eqn)})
    return CompileError(
        f"the step's {loop_kind(eqn)} holds the ETP op(s) {', '.join(names)} and {why}. "
        "Compute the op's output before the loop (ops.dense(x, w) once per step, or on all "
        "sub-step inputs at once) and pass it in, or use a scan with a static length of at "
        f"most {UNROLL_MAX} (unrolled, one trace per iteration)."
    )


def inline_scan(builder, eqn, ins: list) -> list:
    """A scan holding ETP ops: hoisted if they are loop-invariant, else unrolled if short."""
    flags = _invariant(eqn)
    body = eqn.params["jaxpr"].jaxpr
    if all(f for e, f in zip(body.eqns, flags) if _is_etp(e.primitive) or _etp_eqns(e)):
        return _hoist(builder, eqn, ins, flags)
    if eqn.params["length"] > UNROLL_MAX:
        raise _refuse_loop(
            eqn,
            f"more than {UNROLL_MAX} iterations, and an op input changes "
            "from one iteration to the next",
        )
    return _unroll(builder, eqn, ins)


def _invariant(eqn) -> list:
    """Per body equation: whether it reads only the scan's constants (loop-invariant)."""
    closed = eqn.params["jaxpr"]
    known = set(closed.jaxpr.constvars) | set(closed.jaxpr.invars[: eqn.params["num_consts"]])
    known |= set(_passed_through(eqn))
    flags = []
    for e in closed.jaxpr.eqns:
        ok = not e.effects and all(isinstance(a, jcore.Literal) or a in known for a in e.invars)
        flags.append(ok)
        if ok:
            known.update(e.outvars)
    return flags


def _passed_through(eqn) -> list:
    """Carry variables the body returns unchanged (a module's parameters in an NNX loop)."""
    inner, n_consts = eqn.params["jaxpr"].jaxpr, eqn.params["num_consts"]
    carry = inner.invars[n_consts : n_consts + eqn.params["num_carry"]]
    return [v for v, out in zip(carry, inner.outvars) if v is out]


def _hoisted_scan(eqn, flags: list):
    """The scan as a function with its loop-invariant equations moved before the loop."""
    p, closed = eqn.params, eqn.params["jaxpr"]
    inner, n_consts, n_carry = closed.jaxpr, p["num_consts"], p["num_carry"]
    before = [e for e, f in zip(inner.eqns, flags) if f]
    inside = [e for e, f in zip(inner.eqns, flags) if not f]
    carry_vars = inner.invars[n_consts : n_consts + n_carry]
    x_vars = inner.invars[n_consts + n_carry :]

    def run(*operands):
        env = dict(zip(inner.constvars, closed.consts))
        env.update(zip(inner.invars[: n_consts + n_carry], operands[: n_consts + n_carry]))
        eqns.eval_eqns(before, env)

        def step(carry, xs):
            local = dict(env)
            local.update(zip(carry_vars, carry))
            local.update(zip(x_vars, xs))
            eqns.eval_eqns(inside, local)
            outs = [eqns.read(local, v) for v in inner.outvars]
            return outs[:n_carry], outs[n_carry:]

        carry = list(operands[n_consts : n_consts + n_carry])
        xs = list(operands[n_consts + n_carry :])
        carry, ys = lax.scan(step, carry, xs, length=p["length"], reverse=p["reverse"])
        return [*carry, *ys]

    return run


def _hoist(builder, eqn, ins: list, flags: list) -> list:
    outs = emit(builder, _hoisted_scan(eqn, flags), *ins)
    moved = count_etp(eqn.params["jaxpr"])
    last = builder.control[-1]  # the re-traced scan, kept as one node
    builder.control[-1] = dataclasses.replace(last, etp_ops=moved, hoisted=moved)
    return outs


def _unroll(builder, eqn, ins: list) -> list:
    """A scan unrolled into its iterations (at most :data:`UNROLL_MAX`)."""
    p = eqn.params
    body, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
    label = f"{loop_kind(eqn)} #{builder.count('scan')}"  # numbered before nested ones
    builder.control.append(ControlFlow("scan", label, "unrolled", None, count_etp(body)))
    consts = ins[:n_consts]
    carry = ins[n_consts : n_consts + n_carry]
    xs = ins[n_consts + n_carry :]
    steps = range(p["length"])
    per_step: dict = {}
    for k in reversed(steps) if p["reverse"] else steps:
        x_k = [emit(builder, functools.partial(_take, k=k), a)[0] for a in xs]
        outs = builder.inline(body.jaxpr, body.consts, consts + carry + x_k)
        carry, per_step[k] = outs[:n_carry], outs[n_carry:]
    n_ys = len(eqn.outvars) - n_carry
    ys = [emit(builder, _stack, *(per_step[k][j] for k in steps))[0] for j in range(n_ys)]
    return list(carry) + ys


def check_while(eqn) -> None:
    """A while loop may not hold an ETP op (it has no reverse mode, nor a static length)."""
    if _etp_eqns(eqn):
        raise _refuse_loop(eqn, "no static length")
