"""What every online algorithm shares: the state, the learning signal per group,
per-sample mapping and the bookkeeping from ops to parameter leaves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..compiler.graph import ETPGraph, Relation

__all__ = ["LearnerState", "Algorithm", "OnlineAlgorithm"]


class LearnerState(NamedTuple):
    """The learner's carry: a pytree, so it goes through ``jit``, ``scan`` and ``vmap``.

    Attributes
    ----------
    hidden : pytree
        The model's current hidden state ``h^t``.
    traces : pytree
        The algorithm's eligibility traces (empty for BPTT).
    count : Array
        Number of trace updates so far (an ``int32`` scalar).
    """

    hidden: Any
    traces: Any
    count: jax.Array


class Algorithm:
    """Base class of the learning algorithms (``D_RTRL``, ``ES_D_RTRL``, ``BPTT``, ...).

    ``online``: whether ``learner.scan`` sums per-step gradients (memory O(1) in T)
    rather than differentiating through the stored sequence.
    """

    name = "algorithm"
    online = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
    """Abstract trainable inputs of an op (the rules' ``weight_var``)."""
    leaves = {name: param_leaves[leaf] for name, leaf in graph.ops[op].trainables.items()}
    return {
        name: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for name, a in leaves.items()
    }


def with_lead(graph: ETPGraph, relation: Relation, tree):
    """Per-sample zeros ``tree`` given the relation's leading (batch) axis, if any."""
    if not relation.lead:
        return tree
    size = graph.groups[relation.group].shape[0]
    return jax.tree_util.tree_map(lambda a: jnp.zeros((size,) + a.shape, a.dtype), tree)


def x_axis(graph: ETPGraph, relation: Relation, x) -> int | None:
    """``vmap`` axis of an op's input: mapped only when the op itself is batched."""
    return 0 if (x is not None and graph.ops[relation.op].batched) else None


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


class OnlineAlgorithm(Algorithm):
    """An algorithm that carries eligibility traces forward in time.

    Subclasses implement :meth:`init_traces`, :meth:`credit` and :meth:`update`.
    """

    def init_traces(self, graph: ETPGraph, params_leaves: list) -> Any:
        raise NotImplementedError

    def credit(self, graph, params_leaves, traces, signals, count) -> dict:
        """``{params leaf index: <dl_t/dh^{t-1}, eps^{t-1}>}`` for trace-trained leaves."""
        raise NotImplementedError

    def update(self, graph, params_leaves, traces, parts, count) -> Any:
        """Traces after this step: ``eps^t`` from ``eps^{t-1}`` and the step's parts."""
        raise NotImplementedError
