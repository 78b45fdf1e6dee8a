"""How a graph's ops and groups map onto the flat ``params`` and ``hidden`` leaves.

Small helpers the online algorithms share: the rules' ``w`` for an op, the abstract
trainables its ``init_*`` rules see, per-sample mapping over a relation's leading
(batch) axis, and accumulation of gradients by ``params`` leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ..compiler import index_maps
from ..compiler.graph import ETPGraph, Relation

__all__ = [
    "zero_after",
    "stack_group",
    "op_weights",
    "weight_structs",
    "with_lead",
    "per_sample",
    "add_into",
    "sum_lead",
    "to_outputs",
]


def stack_group(graph: ETPGraph, group: int, hidden_leaves: list) -> jax.Array:
    """Stack a group's hidden leaves on a trailing state axis."""
    return jnp.stack([hidden_leaves[i] for i in graph.groups[group].leaves], axis=-1)


def op_weights(graph: ETPGraph, op: int, param_leaves: list) -> dict:
    """The rules' ``w``: the op's trainable inputs and its frozen operands, by name."""
    info = graph.ops[op]
    w = {name: param_leaves[leaf] for name, leaf in info.trainables.items()}
    for name, (kind, value) in info.frozen.items():
        w[name] = param_leaves[value] if kind == "param" else value
    return w


def weight_structs(graph: ETPGraph, op: int, param_leaves: list) -> dict:
    """Abstract trainable inputs of an op (the ``init_*`` rules' ``weight_var``)."""
    leaves = {name: param_leaves[leaf] for name, leaf in graph.ops[op].trainables.items()}
    return {
        name: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for name, a in leaves.items()
    }


def with_lead(graph: ETPGraph, relation: Relation, tree):
    """Zeros like one sample's ``tree``, with the relation's leading (batch) axis if any."""
    if not relation.lead:
        return tree
    size = graph.groups[relation.group].shape[0]
    return jax.tree_util.tree_map(lambda a: jnp.zeros((size,) + a.shape, a.dtype), tree)


def per_sample(fn: Callable, relation: Relation, in_axes) -> Callable:
    """``fn`` mapped over the relation's leading (batch) axis, if it has one."""
    return jax.vmap(fn, in_axes=in_axes) if relation.lead else fn


def add_into(grads: dict, op_leaves: dict, dw: dict) -> None:
    """Accumulate ``dw`` (by trainable name) into ``grads`` (by params leaf index)."""
    for name, leaf in op_leaves.items():
        value = dw[name]
        grads[leaf] = grads[leaf] + value if leaf in grads else value


def sum_lead(tree, relation: Relation):
    """Sum a per-sample result over the relation's leading axis."""
    if not relation.lead:
        return tree
    return jax.tree_util.tree_map(lambda a: a.sum(0), tree)


def to_outputs(graph: ETPGraph, relation: Relation, per_position: jax.Array) -> jax.Array:
    """A per-position array ``(*lead, *positions, *tail)`` seen per element of the op's ``y``.

    The identity unless the relation has an index map: element ``j`` of ``y`` then
    reads position ``index_map[j]`` (zero where it reaches none). ``D`` and the
    learning signal go through this before meeting a trace.
    """
    if relation.index_map is None:
        return per_position
    _, y_var = graph.ops[relation.op].sample_vars()
    n_pos = len(graph.groups[relation.group].shape) - relation.lead
    lead = per_position.shape[: relation.lead]
    tail = per_position.shape[relation.lead + n_pos :]
    flat = per_position.reshape(lead + (-1,) + tail)
    picked = index_maps.take_mapped([flat], None, relation.index_map, relation.lead)
    return picked.reshape(lead + tuple(y_var.shape) + tail)


def zero_after(tree) -> jax.Array:
    """A float32 scalar zero that XLA can only compute once every leaf of ``tree`` exists.

    Added to an input of a later computation, it orders that computation after the
    ones producing ``tree`` (a data edge; ``optimization_barrier`` only orders, and on
    CPU does not stop fusion). ``isnan(...) * 0`` is a zero even for a non-finite leaf.
    """
    flags = [jnp.isnan(v.ravel()[0]) for v in jax.tree_util.tree_leaves(tree) if v.size]
    if not flags:
        return jnp.zeros((), jnp.float32)
    return functools.reduce(jnp.logical_or, flags).astype(jnp.float32) * 0.0
