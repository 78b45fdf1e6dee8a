"""The Equinox face of the braintrace learner: models in, model-shaped grads out.

A model is called on one sample as ``model(x, hidden) -> (hidden, out)``. Its
trainable arrays (:func:`braintrace_eqx.trainable`) are the core learner's
``params``; everything else is closed over, so the core sees the step
``(params, hidden, x) -> (new_hidden, out)`` it expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from braintrace.algorithms import Algorithm, checks
from braintrace.algorithms.face import FaceLearner, ModelSplit

from .filters import trainable

__all__ = ["Learner", "compile"]

_WHERE = "braintrace_eqx learner"


@dataclasses.dataclass(frozen=True)
class _Split:
    """The Equinox face's :class:`~braintrace.algorithms.face.Splitter`: the arrays the
    filter spec selects are the core's params; the rest of the model is closed over.
    ``structure`` is that of the compiled model's params (a changed model is refused)."""

    filter_spec: Any
    batched: bool
    structure: Any = None

    @classmethod
    def of(cls, model: Any, filter_spec: Any, batched: bool) -> _Split:
        split = cls(filter_spec, batched)
        return dataclasses.replace(
            split, structure=jax.tree_util.tree_structure(split.params(model))
        )

    def spec(self, model: Any) -> Any:
        return self.filter_spec(model) if callable(self.filter_spec) else self.filter_spec

    def params(self, model: Any) -> Any:
        return eqx.filter(model, self.spec(model))

    def split(self, model: Any, what: str) -> ModelSplit:
        params, static = eqx.partition(model, self.spec(model))
        if jax.tree_util.tree_structure(params) != self.structure:
            raise ValueError(
                f"{_WHERE}.{what}: this model's structure differs from the model given to "
                "braintrace_eqx.compile (a layer or a trainable leaf was added, removed or "
                "frozen); compile a new learner for the new model."
            )

        def per_sample(p, hidden, x):
            result = eqx.combine(p, static)(x, hidden)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise TypeError(
                    f"{_WHERE}: the model must return (hidden, out) from model(x, hidden); got "
                    f"{type(result).__name__}"
                    + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
                    + "."
                )
            return tuple(result)

        step = jax.vmap(per_sample, in_axes=(None, 0, 0)) if self.batched else per_sample
        return ModelSplit(step, params, _identity)


def _identity(grads: Any) -> Any:
    return grads


class Learner(FaceLearner):
    """An online learner for an Equinox model; create it with :func:`braintrace_eqx.compile`.

    Every method takes the current ``model`` first (it changes as you train) and is
    a pure function of its arguments: wrap a training step in ``eqx.filter_jit``.
    ``grads`` always have the structure of ``learner.params(model)`` (``None`` at
    non-trainable leaves), which is what ``optax`` and ``eqx.apply_updates`` take.
    ``init``, ``step``, ``window``, ``scan``, ``reset`` and ``report`` are those of
    :class:`braintrace.algorithms.face.FaceLearner`; ``report`` paths are attribute
    paths such as ``.cell.linear.weight``. With ``batched=True`` every leaf of
    ``hidden``, ``x`` and ``target`` has a leading batch axis.
    """

    face_name = "braintrace_eqx.Learner"

    def __init__(
        self,
        model: Any,
        loss_fn: Callable,
        algorithm: Algorithm,
        *,
        batched: bool = True,
        strict: bool = False,
        filter_spec: Any = trainable,
    ):
        if not callable(model):
            raise TypeError(
                f"braintrace_eqx.compile: model must be callable as model(x, hidden) -> "
                f"(hidden, out), got {type(model).__name__}."
            )
        if not callable(loss_fn):
            raise TypeError("braintrace_eqx.compile: loss_fn(out, target) must be callable.")
        checks.check_algorithm(algorithm, "braintrace_eqx.compile")
        self.filter_spec = filter_spec
        splitter = _Split.of(model, filter_spec, bool(batched))
        super().__init__(splitter, model, loss_fn, algorithm, batched=batched, strict=strict)

    def params(self, model: Any) -> Any:
        """The trained arrays of ``model`` (``eqx.filter(model, spec)``): give this to
        ``optimizer.init``; gradients have its structure."""
        return self.splitter.params(model)


def compile(
    model: Any,
    loss_fn: Callable,
    algorithm: Algorithm,
    *,  # noqa: A001
    batched: bool = True,
    strict: bool = False,
    filter_spec: Any = trainable,
) -> Learner:
    """Compile an Equinox model and a loss into an online learner.

    Parameters
    ----------
    model : eqx.Module
        Called on one sample as ``model(x, hidden) -> (hidden, out)``. Route the
        weights that drive the hidden state through braintrace_eqx layers so they
        get eligibility traces (check with ``learner.report``).
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    algorithm : braintrace.Algorithm
        ``bt.D_RTRL()``, ``bt.pp_prop(...)`` / ``bt.ES_D_RTRL(...)`` or ``bt.BPTT()``.
    batched : bool
        ``True`` (the default in every face) when ``x``, ``target`` and every
        ``hidden`` leaf carry a leading batch axis: the learner vmaps the per-sample
        model, keeps a trace per sample and averages the loss over the batch.
        ``False`` for one unbatched sequence.
    strict : bool
        Raise instead of warning when a parameter's gradient would be truncated.
    filter_spec : PyTree[bool] or callable, optional
        Which leaves are trained: a filter spec, or a function ``model -> spec``.
        Default :func:`braintrace_eqx.trainable` (inexact arrays minus frozen fields).

    Returns
    -------
    Learner

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace as bt, braintrace_eqx as bte
    >>> class Model(eqx.Module):
    ...     cell: bte.ETPLIFCell
    ...     readout: eqx.nn.Linear
    ...     def __call__(self, x, hidden):
    ...         hidden = self.cell(x, hidden)
    ...         return hidden, self.readout(hidden[0])
    >>> k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    >>> model = Model(bte.ETPLIFCell(3, 4, key=k1), eqx.nn.Linear(4, 2, key=k2))
    >>> mse = lambda out, y: jnp.sum((out - y) ** 2)
    >>> learner = bte.compile(model, mse, bt.D_RTRL())
    >>> hidden = (jnp.zeros((5, 4)), jnp.zeros((5, 4)))
    >>> state = learner.init(model, hidden, jnp.zeros((5, 3)))
    >>> xs, ys = jnp.ones((7, 5, 3)), jnp.zeros((7, 5, 2))
    >>> (losses, _), grads, state = eqx.filter_jit(learner.scan)(model, state, xs, ys)
    >>> grads.cell.linear.weight.shape, losses.shape
    ((4, 3), (7,))
    """
    return Learner(
        model, loss_fn, algorithm, batched=batched, strict=strict, filter_spec=filter_spec
    )
