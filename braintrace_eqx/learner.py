"""The Equinox face of the braintrace learner: models in, model-shaped grads out.

A model is called on one sample as ``model(x, hidden) -> (hidden, out)``. Its
trainable arrays (:func:`braintrace_eqx.trainable`) are the core learner's
``params``; everything else is closed over, so the core sees the step
``(params, hidden, x) -> (new_hidden, out)`` it expects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

import braintrace as bt
from braintrace.algorithms import Algorithm, LearnerState, checks
from braintrace.compiler import CompileReport

from .filters import trainable

__all__ = ["Learner", "compile"]

_WHERE = "braintrace_eqx learner"


class Learner:
    """An online learner for an Equinox model; create it with :func:`braintrace_eqx.compile`.

    Every method takes the current ``model`` first (it changes as you train) and is
    a pure function of its arguments: wrap a training step in ``eqx.filter_jit``.
    ``grads`` always have the structure of ``learner.params(model)`` (``None`` at
    non-trainable leaves), which is what ``optax`` and ``eqx.apply_updates`` take.
    """

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
        self.loss_fn = loss_fn
        self.algorithm = algorithm
        self.batched = bool(batched)
        self.strict = bool(strict)
        self.filter_spec = filter_spec
        self._structure = jax.tree_util.tree_structure(self.params(model))
        self._template, _ = self._core(model, "compile")

    def __repr__(self) -> str:
        return (
            f"braintrace_eqx.Learner({self.algorithm!r}, batched={self.batched}, "
            f"strict={self.strict})"
        )

    # -- the model as a core step ----------------------------------------------------
    def _spec(self, model: Any) -> Any:
        return self.filter_spec(model) if callable(self.filter_spec) else self.filter_spec

    def params(self, model: Any) -> Any:
        """The trained arrays of ``model`` (``eqx.filter(model, spec)``): give this to
        ``optimizer.init``; gradients have its structure."""
        return eqx.filter(model, self._spec(model))

    def _core(self, model: Any, what: str) -> tuple[bt.Learner, Any]:
        params, static = eqx.partition(model, self._spec(model))
        if jax.tree_util.tree_structure(params) != self._structure:
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
        core = bt.compile(
            step, self.loss_fn, self.algorithm, batched=self.batched, strict=self.strict
        )
        return core, params

    def core_of(self, model: Any) -> tuple[bt.Learner, Any, Callable]:
        """``(core learner, params, to_grads)`` for ``model``: the core learner of its
        step, its trained arrays, and the map from core gradients to this face's
        (here the identity). ``braintrace.parallel.data_parallel`` uses it."""
        core, params = self._core(model, "core_of")
        return core, params, lambda grads: grads

    # -- the learner API ---------------------------------------------------------------
    def report(self, model: Any, hidden: Any, x: Any) -> CompileReport:
        """The compile report; paths are attribute paths such as ``.cell.linear.weight``."""
        core, params = self._core(model, "report")
        return core.report(params, hidden, x)

    def init(self, model: Any, hidden: Any, x: Any, *, key: Any = None) -> LearnerState:
        """Zero traces for the initial ``hidden`` (``x``: one step's input, for shapes).

        With ``batched=True`` every leaf of ``hidden`` and ``x`` has a leading batch axis.
        ``key`` seeds a random algorithm (see ``braintrace.Learner.init``).
        """
        core, params = self._core(model, "init")
        return core.init(params, hidden, x, key=key)

    def step(self, model: Any, state: LearnerState, x: Any, target: Any):
        """One time step: ``((loss, out), grads, new_state)``.

        ``loss`` is ``loss_fn(out, target)`` (the batch mean with ``batched=True``);
        ``grads`` is braintrace's online gradient of it, shaped like
        ``learner.params(model)``.
        """
        core, params = self._core(model, "step")
        return core.step(params, state, x, target)

    def scan(
        self, model: Any, state: LearnerState, xs: Any, targets: Any, window: int | None = None
    ):
        """Run over time-major ``xs``/``targets``: ``((losses, outs), grads, state)``.

        ``grads`` is the sum of the gradients of consecutive windows of ``window``
        steps (``braintrace.Learner.scan``; for ``bt.BPTT()`` the exact gradient of the
        summed loss), shaped like ``learner.params(model)``.
        """
        core, params = self._core(model, "scan")
        return core.scan(params, state, xs, targets, window=window)

    def window(self, model: Any, state: LearnerState, xs: Any, targets: Any):
        """One window of ``len(xs)`` time-major steps (``braintrace.Learner.window``)."""
        core, params = self._core(model, "window")
        return core.window(params, state, xs, targets)

    def reset(self, state: LearnerState, mask: Any = None, hidden: Any = None) -> LearnerState:
        """Start new episodes: fresh hidden state, zero traces (``braintrace.Learner.reset``)."""
        return self._template.reset(state, mask=mask, hidden=hidden)


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
