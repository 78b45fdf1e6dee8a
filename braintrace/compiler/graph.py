"""The eligibility-trace graph of one step.

:class:`ETPGraph` (built by :func:`braintrace.compiler.compile_graph`) lists the ETP
ops, the hidden groups and the relations between them;
:func:`braintrace.compiler.forward.forward` evaluates a step on it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from .. import registry
from ..rules import SampleRules
from . import program as prog
from .errors import CompileError

__all__ = ["ETPGraph", "OpInfo", "HiddenGroup", "Relation", "SelfLoop", "StepParts"]


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
    # frozen operand name -> ("param", flat params leaf index) or ("const", value)
    frozen: dict = dataclasses.field(default_factory=dict)

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
    #: ``coupling[a][c]``: whether state ``c``'s old value can reach state ``a``'s new
    #: one through kept paths, i.e. whether ``D[..., a, c]`` may be non-zero. Where it
    #: is ``False`` the block is a structural zero. Empty: every block may be non-zero.
    coupling: tuple = ()

    @property
    def num_states(self) -> int:
        return len(self.leaves)

    def couples(self, a: int, c: int) -> bool:
        """Whether ``D[..., a, c]`` may be non-zero (see ``coupling``)."""
        return not self.coupling or self.coupling[a][c]


@dataclasses.dataclass(frozen=True)
class Relation:
    """An op whose output reaches a group through position-preserving paths."""

    index: int
    op: int
    group: int
    lead: int  # 1 when the relation is vmapped over a leading (batch) axis
    dropped: tuple = ()  # names of non-position-preserving paths left out of D_f
    #: Per element of one sample's ``y`` (flattened), the flat position it reaches in
    #: the group (``-1``: none); ``None`` when ``y`` maps onto the positions as is.
    index_map: tuple | None = None
    #: Per state of the group: whether ``y`` reaches it through kept paths, i.e.
    #: whether ``D_f[..., a]`` may be non-zero. Empty: every state may be reached.
    reaches: tuple = ()

    def reaches_state(self, a: int) -> bool:
        """Whether ``D_f[..., a]`` may be non-zero (see ``reaches``)."""
        return not self.reaches or self.reaches[a]


@dataclasses.dataclass(frozen=True)
class SelfLoop:
    """A relation whose op reads, position by position, the group it drives.

    A recurrent weight: ``h^{t-1}[k]`` reaches the op's input ``x[k]`` through
    position-preserving paths only, and ``y`` reaches ``h^t``. The step's full
    Jacobian then has a diagonal entry through the op that ``D`` (ETP outputs held
    fixed) leaves out; ``SnAp1`` adds it (``docs/algorithms.md``, "SnAp-1").
    """

    relation: int
    op: int
    group: int
    #: Per state ``c`` of the group: whether ``x`` reads state ``c``.
    reads: tuple
    #: Per element ``j`` of one sample's ``y`` (flat): the flat position of the group
    #: it reaches (``-1``: none), which is also the element of ``x`` at that position.
    input_index: tuple


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["xs", "d", "df", "loops"], meta_fields=[]
)
@dataclasses.dataclass
class StepParts:
    """What one step contributes to the traces.

    ``xs[k]`` is op ``k``'s input (``None`` for ops without one). ``d[g]`` has shape
    ``(*group.shape, S, S)`` with ``d[..., a, c] = dh_a^t / dh_c^{t-1}`` at each
    position; ``df[r]`` has shape ``(*group.shape, S)`` with ``df[..., a] = dh_a^t/dy``.
    ``loops[i]`` (only when asked for, see :class:`SelfLoop`) is the pair
    ``(entries, dx)`` of ``graph.self_loops[i]``: the op's input-Jacobian entries per
    element of one sample's ``y``, and ``dx[..., c] = dx/dh_c^{t-1}`` over the group's
    positions, shaped ``(*group.shape, S)``.
    """

    xs: tuple
    d: tuple
    df: tuple
    loops: tuple = ()


@dataclasses.dataclass
class ETPGraph:
    """The compiled eligibility-trace graph of one step function."""

    batched: bool
    ops: tuple
    groups: tuple
    relations: tuple
    report: Any  # CompileReport, attached once the graph is built
    program: Any
    cut_nodes: dict  # node index -> operand positions whose derivative is cut
    params_def: Any
    hidden_def: Any
    x_def: Any
    out_def: Any
    hidden_avals: tuple
    #: Per op: ``None``, or the tangent class of each element of one sample's ``y``
    #: (flattened) when an index map lets several elements reach one position.
    seed_classes: tuple = ()
    #: The step function the graph was compiled from (the algorithms that
    #: differentiate the whole step, RTRL and UORO, call it).
    step: Any = None
    #: The relations whose op reads the group it drives position by position.
    self_loops: tuple = ()
    #: Why an op that reads the group it drives is not a :class:`SelfLoop`.
    loop_notes: tuple = ()

    @property
    def batch_lead(self) -> tuple:
        """``(B,)`` when batched (every hidden leaf's leading axis), ``()`` otherwise."""
        return (self.hidden_avals[0].shape[0],) if self.batched else ()

    @property
    def traced_ops(self) -> tuple:
        """Indices of ops with at least one relation."""
        return tuple(sorted({r.op for r in self.relations}))

    def relations_of(self, op: int) -> tuple:
        return tuple(r for r in self.relations if r.op == op)

    def classes_of(self, op: int):
        """The op's per-element tangent classes (``None``: one class, no index map)."""
        return self.seed_classes[op] if self.seed_classes else None

    def flat_args(self, params, hidden, x) -> list:
        """The flat leaves of ``(params, hidden, x)``, checked against the compiled structure."""
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
        outs = prog.evaluate(self.program, self.flat_args(params, hidden, x))
        n = len(self.hidden_avals)
        return (
            jax.tree_util.tree_unflatten(self.hidden_def, outs[:n]),
            jax.tree_util.tree_unflatten(self.out_def, outs[n:]),
        )
