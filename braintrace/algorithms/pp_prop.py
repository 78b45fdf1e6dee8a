"""ES-D-RTRL (``pp_prop``): input/output factorised traces, O(I + O S) per sample.

    epsx^t      = alpha_x * epsx^{t-1} + x^t
    epsf^t[k,a] = alpha_f * sum_c D^t[k,a,c] epsf^{t-1}[k,c] + (1 - alpha_f) * D_f^t[k,a]
    dW          = xy_to_dw(epsx, sum_a g[..., a] * epsf[..., a])

(``docs/algorithms.md``, "pp_prop"). ``epsx`` is kept once per op (shared by the
op's relations), ``epsf`` per relation. An op without an input (elementwise
parameters) keeps the exact D-RTRL trace, which is already output-sized.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import registry
from .base import Algorithm, add_bytes
from .relation import credit_relation, init_relation, update_relation
from .wiring import add_into, op_weights, to_outputs, weight_structs, with_lead

__all__ = ["ES_D_RTRL", "pp_prop", "decay_from", "PPTraces"]


class PPTraces(NamedTuple):
    """pp_prop's state.

    Attributes
    ----------
    inputs : tuple
        Per op: ``epsx`` (the op's input shape, per sample when batched), or ``None``
        for ops without an input or without a relation.
    outputs : tuple
        Per relation: ``epsf`` (``y`` shape plus a trailing state axis, per sample),
        or, for an op without an input, its exact D-RTRL trace (see ``D_RTRL``).
    """

    inputs: tuple
    outputs: tuple


def decay_from(value, side: str) -> float:
    """A decay ``alpha`` from a float in ``[0, 1)`` or an int rank ``r >= 1``."""
    if isinstance(value, bool):
        raise TypeError(f"ES_D_RTRL: decay_or_rank ({side}) must be a float or an int, got a bool.")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"ES_D_RTRL: a rank ({side}) must be >= 1, got {value}.")
        return (value - 1) / (value + 1)
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"ES_D_RTRL: a decay ({side}) must be in [0, 1), got {value}.")
        return value
    raise TypeError(
        f"ES_D_RTRL: decay_or_rank ({side}) must be a float decay in [0, 1) or an int rank "
        f">= 1, got {type(value).__name__}."
    )


def _per_sample_inputs(graph, op) -> bool:
    """Whether ``epsx`` has a leading per-sample axis the op's input lacks."""
    return graph.batched and not op.batched


def _input_space(op, w):
    """``x -> `` what ``epsx`` accumulates: the op's ``x_to_input_trace`` rule, else ``x``."""
    if not registry.has_rule(op.primitive, "x_to_input_trace"):
        return lambda x: x
    rule = registry.get_rule(op.primitive, "x_to_input_trace")
    return lambda x: rule(x, w, **op.params)


def _init_inputs(graph, param_leaves) -> tuple:
    traced = set(graph.traced_ops)
    inputs = []
    for op in graph.ops:
        if op.index not in traced or op.x_aval is None:
            inputs.append(None)
            continue
        shape = tuple(op.x_aval.shape)
        if _per_sample_inputs(graph, op):
            shape = graph.batch_lead + shape
        space = _input_space(op, weight_structs(graph, op.index, param_leaves))
        eps = jax.eval_shape(space, jax.ShapeDtypeStruct(shape, op.x_aval.dtype))
        inputs.append(jnp.zeros(eps.shape, eps.dtype))
    return tuple(inputs)


def _broadcast_count(value, like):
    """A per-sample (or scalar) factor reshaped to broadcast against ``like``."""
    return value.reshape(value.shape + (1,) * (jnp.ndim(like) - value.ndim))


def _propagate(d, epsf, group):
    """``sum_c d[..., a, c] * epsf[..., c]``, unrolled over the (1-3) states.

    Elementwise products fuse with the rest of the update; an einsum over so short
    an axis lowers to a slow batched dot on CPU. Structurally zero blocks of ``d``
    (``group.couples``) are skipped.
    """
    states = epsf.shape[-1]
    zero = jnp.zeros_like(epsf[..., 0])
    rows = [
        functools.reduce(
            jnp.add,
            (d[..., a, c] * epsf[..., c] for c in range(states) if group.couples(a, c)),
            zero,
        )
        for a in range(states)
    ]
    return jnp.stack(rows, axis=-1)


class ES_D_RTRL(Algorithm):
    """Exponentially smoothed D-RTRL, a.k.a. ``pp_prop``.

    Parameters
    ----------
    decay_or_rank : float, int or pair
        ``alpha`` in ``[0, 1)``, or an int rank ``r`` meaning
        ``alpha = (r - 1) / (r + 1)``, or an ``(x_side, f_side)`` pair of either.
    warmup_correction : bool
        Divide ``epsf`` by ``1 - alpha_f^n`` (``n`` = this sample's trace updates so
        far), which removes the start-up bias of the ``(1 - alpha_f)`` smoothing.

    Examples
    --------
    >>> import braintrace as bt
    >>> algo = bt.ES_D_RTRL(decay_or_rank=0.9)
    >>> algo.alpha_x, algo.alpha_f
    (0.9, 0.9)
    >>> bt.pp_prop(3).alpha_f
    0.5
    """

    name = "pp_prop"
    traced = True

    def __init__(self, decay_or_rank=0.9, *, warmup_correction: bool = False):
        if isinstance(decay_or_rank, (tuple, list)):
            if len(decay_or_rank) != 2:
                raise ValueError(
                    "ES_D_RTRL: a decay_or_rank pair must be (x_side, f_side), got "
                    f"{len(decay_or_rank)} values."
                )
            x_side, f_side = decay_or_rank
        else:
            x_side = f_side = decay_or_rank
        self.alpha_x = decay_from(x_side, "x side")
        self.alpha_f = decay_from(f_side, "f side")
        self.warmup_correction = bool(warmup_correction)

    def __repr__(self) -> str:
        return (
            f"ES_D_RTRL(decay_or_rank=({self.alpha_x}, {self.alpha_f}), "
            f"warmup_correction={self.warmup_correction})"
        )

    # -- traces ----------------------------------------------------------------------
    def op_trace_bytes(self, graph, param_leaves) -> dict:
        traces = jax.eval_shape(lambda: self.init_traces(graph, param_leaves))
        per_op: dict = {}
        for op, eps_x in zip(graph.ops, traces.inputs):
            add_bytes(per_op, op.index, graph, eps_x)
        for r, eps_f in zip(graph.relations, traces.outputs):
            add_bytes(per_op, r.op, graph, eps_f)
        return per_op

    def init_traces(self, graph, param_leaves, key=None) -> PPTraces:
        outputs = []
        for r in graph.relations:
            op = graph.ops[r.op]
            if op.x_aval is None:
                outputs.append(init_relation(graph, r, param_leaves))
                continue
            x_var, y_var = op.sample_vars()
            w_var = weight_structs(graph, r.op, param_leaves)
            epsf = op.rules.init_pp(x_var, y_var, w_var, graph.groups[r.group].num_states)
            outputs.append(with_lead(graph, r, epsf))
        return PPTraces(_init_inputs(graph, param_leaves), tuple(outputs))

    def _correction(self, count, dtype):
        """``1 / (1 - alpha_f^n)`` after ``n`` trace updates (1 without the correction)."""
        if not self.warmup_correction or self.alpha_f == 0.0:
            return jnp.ones(jnp.shape(count), dtype)
        n = jnp.maximum(count, 1).astype(dtype)
        return 1.0 / (1.0 - jnp.asarray(self.alpha_f, dtype) ** n)

    def credit(self, graph, param_leaves, traces, signals, count) -> dict:
        grads: dict = {}
        for r, epsf in zip(graph.relations, traces.outputs):
            op = graph.ops[r.op]
            if op.x_aval is None:
                credit_relation(graph, r, param_leaves, epsf, signals.groups[r.group], grads)
                continue
            ghat = (to_outputs(graph, r, signals.groups[r.group]) * epsf).sum(-1)
            ghat = ghat * _broadcast_count(self._correction(count, ghat.dtype), ghat)
            w = op_weights(graph, r.op, param_leaves)
            epsx = traces.inputs[op.index]
            if self.alpha_x:
                epsx, ghat = self._bias_scaled(epsx, ghat, count)
            add_into(grads, op.trainables, self._factorised_dw(graph, op, epsx, ghat, w))
        return grads

    def _bias_scaled(self, epsx, ghat, count):
        """``(epsx / e_n, ghat * e_n)``: input-free trainables get their own input trace.

        A bias is a weight on a constant input 1, whose input trace after ``n``
        updates is ``e_n = sum_{j<n} alpha_x^j``, while ``xy_to_dw`` at ``epsx`` gives
        such trainables the factor 1. ``xy_to_dw`` is bilinear in ``(x, g)`` for the
        weights and linear in ``g`` for the input-free part, so scaling each sample's
        ``x`` by ``1 / e_n`` and its ``g`` by ``e_n`` keeps the weights' gradient and
        gives the bias its ``e_n`` in the same call: a bias and a constant-1 input
        column train identically (as they do under D-RTRL and BPTT).
        """
        n = jnp.maximum(count, 1).astype(epsx.dtype)
        alpha = jnp.asarray(self.alpha_x, epsx.dtype)
        e_n = (1.0 - alpha**n) / (1.0 - alpha)  # >= 1
        return epsx / _broadcast_count(e_n, epsx), ghat * _broadcast_count(e_n, ghat)

    def _factorised_dw(self, graph, op, epsx, ghat, w) -> dict:
        """``xy_to_dw(epsx, ghat)`` summed over samples."""
        if op.batched:
            # The op's own VJP rule sums over its batch axis.
            rule = registry.get_rule(op.primitive, "xy_to_dw")
            return rule(epsx, ghat.astype(epsx.dtype), w, **op.params)
        if _per_sample_inputs(graph, op):
            per = jax.vmap(lambda e, g: op.rules.xy_to_dw(e, g.astype(e.dtype), w))(epsx, ghat)
            return jax.tree_util.tree_map(lambda a: a.sum(0), per)
        return op.rules.xy_to_dw(epsx, ghat.astype(epsx.dtype), w)

    def _input_trace(self, graph, k, param_leaves, eps, x):
        """``alpha_x * eps + x`` with op ``k``'s ``x`` in its input-trace space."""
        if eps is None:
            return None
        op = graph.ops[k]
        if registry.has_rule(op.primitive, "x_to_input_trace"):
            x = _input_space(op, op_weights(graph, k, param_leaves))(x)
        return self.alpha_x * eps + x.astype(eps.dtype)

    def update(self, graph, param_leaves, traces, parts, count) -> PPTraces:
        inputs = tuple(
            self._input_trace(graph, k, param_leaves, eps, parts.xs[k])
            for k, eps in enumerate(traces.inputs)
        )
        outputs = []
        for r, epsf in zip(graph.relations, traces.outputs):
            if graph.ops[r.op].x_aval is None:
                outputs.append(update_relation(graph, r, param_leaves, epsf, parts))
                continue
            d, df = to_outputs(graph, r, parts.d[r.group]), parts.df[r.index]
            propagated = _propagate(d, epsf, graph.groups[r.group])
            new = self.alpha_f * propagated + (1.0 - self.alpha_f) * df
            outputs.append(new.astype(epsf.dtype))
        return PPTraces(inputs, tuple(outputs))


#: ``pp_prop`` is the name used in the braintrace papers for ES-D-RTRL.
pp_prop = ES_D_RTRL
