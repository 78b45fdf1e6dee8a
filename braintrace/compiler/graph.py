"""The eligibility-trace graph of one step, and how to evaluate its parts.

:class:`ETPGraph` (built by :func:`braintrace.compiler.compile_graph`) lists the ETP
ops, the hidden groups and the relations between them; :meth:`ETPGraph.parts`
evaluates, for one step, every op's input ``x``, ``D`` per group and ``D_f`` per
relation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from .. import registry
from ..rules import SampleRules
from . import program as prog
from .errors import CompileError
from .program import is_inexact

__all__ = ["ETPGraph", "OpInfo", "HiddenGroup", "Relation", "StepParts"]


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


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["new_hidden", "out", "xs", "d", "df"],
    meta_fields=[],
)
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
        float_leaves = [i for i, a in enumerate(self.hidden_avals) if is_inexact(a)]
        traced = self.traced_ops
        node_to_op = {op.node: op for op in self.ops}
        perturb_slot = {k: j for j, k in enumerate(traced)}
        y_zeros = [jnp.zeros(self.ops[k].y_aval.shape, self.ops[k].y_aval.dtype) for k in traced]

        def before(index, node, invals):
            cut = self.cut_nodes.get(index)
            if not cut:
                return invals
            return [
                jax.lax.stop_gradient(v) if j in cut and is_inexact(v) else v
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


