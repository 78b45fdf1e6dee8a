"""From an NNX model to braintrace's online learner: ``nnx.Param`` s in, ``nnx.State`` grads out.

A model is called as ``model(carry, x) -> (carry, out)`` (the NNX cell convention;
an ``nnx.RNN`` is trained through its cell). At every call the learner splits the
current model into the variables it trains (``wrt``, default ``nnx.Param``) and the
rest; the core learner sees the step ``(params, carry, x) -> (carry, out)`` over the
trained values, and the gradients come back as an ``nnx.State`` of those variables,
which is what ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)`` takes.
Variables outside ``wrt`` (a frozen LoRA base, constants) are read as constants; a
model that changes one during a step (batch statistics, RNG counters) is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from braintrace.algorithms import Algorithm
from braintrace.algorithms.face import FaceLearner, ModelSplit

from .._sequence import SequenceLearner, check_rnn_options, time_axis

__all__ = ["Learner", "compile"]

_WHERE = "braintrace_flax.nnx learner"


def _check_model(model: Any) -> None:
    if isinstance(model, type):
        raise TypeError(
            f"braintrace_flax.nnx.compile: pass a module instance, e.g. "
            f"{model.__name__}(..., rngs=nnx.Rngs(0)), not the class."
        )
    if not isinstance(model, nnx.Module):
        raise TypeError(
            "braintrace_flax.nnx.compile: model must be a flax.nnx.Module called as "
            f"model(carry, x) -> (carry, out), got {type(model).__name__}. For a linen "
            "module use braintrace_flax.compile."
        )


def _values(model: nnx.Module) -> dict:
    """``{path: (variable type, value object)}`` for every variable of ``model``."""
    return {path: (type(var), var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def _changed(before: dict, after: dict) -> list[str]:
    """Variables added, removed, or given a new value since ``before``."""
    paths = sorted(set(before) | set(after), key=str)
    return [
        f"{'/'.join(map(str, path))} ({(after.get(path) or before[path])[0].__name__})"
        for path in paths
        if path not in before or path not in after or before[path][1] is not after[path][1]
    ]


def _call(model: nnx.Module, carry: Any, x: Any) -> tuple[Any, Any]:
    """One step of ``model`` (an ``nnx.RNN``'s cell), refusing state updates."""
    step = model.cell if isinstance(model, nnx.RNN) else model
    before = _values(model)
    result = step(carry, x)
    changed = _changed(before, _values(model))
    if changed:
        raise ValueError(
            f"{_WHERE}: the model changed {', '.join(changed)} during a step. The online "
            "learner reads variables outside wrt as constants and cannot carry their updates "
            "through its traces. Switch the behaviour off for training (e.g. model.eval() for "
            "batch statistics, deterministic dropout), or keep that state in the carry."
        )
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise TypeError(
            f"{_WHERE}: the model must return (carry, out) from model(carry, x); got "
            f"{type(result).__name__}."
        )
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class _Split:
    """The NNX face's :class:`~braintrace.algorithms.face.Splitter`: a model's ``wrt``
    variables are the core's params; the rest is merged back in as constants.
    ``structure`` is that of the compiled model's ``wrt`` state (a changed model is
    refused)."""

    wrt: Any
    structure: Any

    @classmethod
    def of(cls, model: nnx.Module, wrt: Any) -> _Split:
        return cls(wrt, jax.tree_util.tree_structure(nnx.state(model, wrt)))

    def split(self, model: nnx.Module, what: str) -> ModelSplit:
        _check_model(model)
        graphdef, params, rest = nnx.split(model, self.wrt, ...)
        treedef = jax.tree_util.tree_structure(params)
        if treedef != self.structure:
            raise ValueError(
                f"{_WHERE}.{what}: this model's {self.wrt} variables differ from those of the "
                "model given to compile (a layer was added, removed or changed); compile a "
                "new learner for the new model."
            )

        def to_state(values: Any) -> nnx.State:
            return jax.tree_util.tree_unflatten(treedef, jax.tree_util.tree_leaves(values))

        def step(values, carry, x):
            # Fresh Variables inside the trace, so a mutation reaches _call's check.
            return _call(nnx.merge(graphdef, to_state(values), rest, copy=True), carry, x)

        return ModelSplit(step, nnx.as_pure(params), to_state)


class Learner(FaceLearner):
    """An online learner for an NNX model; create it with :func:`braintrace_flax.nnx.compile`.

    Every method takes the current ``model`` first (it changes as you train) and is a
    pure function of its arguments: wrap a training step in ``nnx.jit``. ``grads`` is
    an ``nnx.State`` of the ``wrt`` variables (``nnx.state(model, wrt)``'s structure).
    ``init``, ``step``, ``window``, ``scan``, ``reset`` and ``report`` are those of
    :class:`braintrace.algorithms.face.FaceLearner`; ``report`` paths read like
    ``"['dense_h']['kernel']"``.
    """

    face_name = "braintrace_flax.nnx.Learner"

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: Callable,
        algorithm: Algorithm,
        *,
        batched: bool = True,
        strict: bool = False,
        wrt: Any = nnx.Param,
    ):
        _check_model(model)
        self.wrt = wrt
        super().__init__(
            _Split.of(model, wrt), model, loss_fn, algorithm, batched=batched, strict=strict
        )


def compile(  # noqa: A001 - mirrors braintrace.compile
    model: nnx.Module,
    loss_fn: Callable,
    algorithm: Algorithm,
    *,
    batched: bool = True,
    strict: bool = False,
    wrt: Any = nnx.Param,
) -> Learner | SequenceLearner:
    """Compile an NNX recurrent model and a loss into an online learner.

    Parameters
    ----------
    model : nnx.Module
        Called as ``model(carry, x) -> (carry, out)`` (a cell, or a module around
        one), or an ``nnx.RNN``: its cell is trained, and ``scan``/``window`` take and
        return sequences in the RNN's layout (batch-major unless ``time_major=True``).
        Run stock layers through ETP ops first with :func:`braintrace_flax.nnx.convert`.
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    algorithm : braintrace.Algorithm
        ``bt.D_RTRL()``, ``bt.pp_prop(...)``, ``bt.OneStep()`` or ``bt.BPTT()``.
    batched : bool
        ``True`` (the default in every face): ``x``, every carry leaf and ``target``
        have a leading batch axis; the per-step loss is the batch mean of ``loss_fn``.
    strict : bool
        Raise instead of warning when a parameter's gradient would be truncated.
    wrt : nnx filter
        The variables to train (default ``nnx.Param``; ``nnx.LoRAParam`` trains only
        LoRA adapters). Use the same filter for ``nnx.Optimizer``.

    Returns
    -------
    Learner
        ``init(model, carry, x)``, ``step(model, state, x, target)``,
        ``scan(model, state, xs, targets, window=None)``, ``window(...)``,
        ``reset(state, mask=None, hidden=None)`` and ``report(model, carry, x)``.

    Examples
    --------
    >>> import jax.numpy as jnp, optax, braintrace as bt
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = btnnx.convert(nnx.SimpleCell(3, 4, rngs=nnx.Rngs(0)))
    >>> mse = lambda out, target: jnp.sum((out - target) ** 2)
    >>> learner = btnnx.compile(cell, mse, bt.D_RTRL())
    >>> optimizer = nnx.Optimizer(cell, optax.adam(1e-2), wrt=nnx.Param)
    >>> h, x, y = (jnp.zeros((2, 4), jnp.float32), jnp.ones((2, 3), jnp.float32),
    ...            jnp.zeros((2, 4), jnp.float32))
    >>> learner.report(cell, h, x).param("['dense_i']['kernel']").mode
    'trace'
    >>> @nnx.jit
    ... def train_step(cell, optimizer, state, x, y):
    ...     (loss, out), grads, state = learner.step(cell, state, x, y)
    ...     optimizer.update(cell, grads)
    ...     return loss, state
    >>> loss, state = train_step(cell, optimizer, learner.init(cell, h, x), x, y)
    """
    learner = Learner(model, loss_fn, algorithm, batched=batched, strict=strict, wrt=wrt)
    if isinstance(model, nnx.RNN):
        check_rnn_options(model, "braintrace_flax.nnx.compile")
        return SequenceLearner(learner, time_axis(model.time_major, batched))
    return learner
