"""One learner for the model faces (NNX, Equinox): forwarding to the core learner.

A face learner takes the current *model* where the core :class:`~.learner.Learner`
takes ``params``. The only thing a face knows that the core does not is how to split
a model into the core's three ingredients (a :class:`ModelSplit`):

- ``step(params, hidden, x) -> (new_hidden, out)``, the model's step over its
  trained arrays (everything else closed over);
- ``params``, those trained arrays;
- ``to_grads``, the map from the core's gradients (``params``-shaped) back to the
  face's own form (an ``nnx.State``, or the identity for Equinox).

A face supplies that split as a :class:`Splitter`; :class:`FaceLearner` owns
everything else (compiling the core learner for the split, and ``init``, ``step``,
``window``, ``scan``, ``reset`` and ``report``). :mod:`braintrace.parallel`
recognises a face learner by this type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ..compiler.report import CompileReport
from .base import Algorithm, LearnerState
from .learner import Learner, compile

__all__ = ["ModelSplit", "Splitter", "FaceLearner"]


class ModelSplit(NamedTuple):
    """A model seen by the core learner: its step, its trained arrays, and the way back.

    Attributes
    ----------
    step : callable
        ``step(params, hidden, x) -> (new_hidden, out)`` (batched when the learner is).
    params : pytree
        The model's trained arrays, as the core learner's ``params``.
    to_grads : callable
        Core gradients (``params``-shaped) to the gradients the face returns.
    """

    step: Callable
    params: Any
    to_grads: Callable


@runtime_checkable
class Splitter(Protocol):
    """What a model face supplies: how to split its model for the core learner.

    ``split(model, what)`` returns the :class:`ModelSplit` of ``model``; ``what``
    names the learner method asking (``"init"``, ``"step"``, ...) for its error
    messages, e.g. when the model's trained leaves no longer match the model the
    learner was compiled for.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace as bt
    >>> from braintrace import ops
    >>> from braintrace.algorithms.face import FaceLearner, ModelSplit
    >>> class DictSplit:  # a "model" that is a dict holding its params
    ...     def split(self, model, what):
    ...         step = lambda p, h, x: (0.5 * h + ops.dense(x, p["w"]), h)
    ...         return ModelSplit(step, model["params"], lambda g: {"params": g})
    >>> model = {"params": {"w": jnp.ones((3, 2))}}
    >>> learner = FaceLearner(DictSplit(), model, lambda o, y: jnp.sum((o - y) ** 2),
    ...                       bt.D_RTRL(), batched=False)
    >>> state = learner.init(model, jnp.zeros(2), jnp.ones(3))
    >>> _, grads, state = learner.step(model, state, jnp.ones(3), jnp.zeros(2))
    >>> grads["params"]["w"].shape
    (3, 2)
    """

    def split(self, model: Any, what: str) -> ModelSplit: ...


class FaceLearner:
    """The learner of a model face: the core learner, with the model in place of ``params``.

    Every method takes the current ``model`` first (it changes as you train), splits
    it with the face's :class:`Splitter` and forwards to a core
    :class:`~braintrace.Learner` compiled for that split; gradients come back through
    the split's ``to_grads``. Every method is a pure function of its arguments.

    Parameters
    ----------
    splitter : Splitter
        The face's split of a model (see :class:`Splitter` for an example).
    model : any
        The model the learner is compiled for (split once here, so a bad model fails
        at compile time).
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    algorithm : braintrace.Algorithm
    batched, strict : bool
        As for :func:`braintrace.compile`.
    """

    #: How the learner names itself in its ``repr`` (a face sets its public name).
    face_name = "FaceLearner"

    def __init__(
        self,
        splitter: Splitter,
        model: Any,
        loss_fn: Callable,
        algorithm: Algorithm,
        *,
        batched: bool = True,
        strict: bool = False,
    ):
        self.splitter = splitter
        self.loss_fn = loss_fn
        self.algorithm = algorithm
        self.batched = bool(batched)
        self.strict = bool(strict)
        self._template = self.core_of(model, "compile")[0]

    def __repr__(self) -> str:
        return f"{self.face_name}({self.algorithm!r}, batched={self.batched}, strict={self.strict})"

    def core_of(self, model: Any, what: str = "core_of") -> tuple[Learner, Any, Callable]:
        """``(core learner, params, to_grads)`` for ``model``: the core learner of its
        step, its trained arrays, and the map from core gradients to this face's.
        ``braintrace.parallel.data_parallel`` uses it."""
        split = self.splitter.split(model, what)
        core = compile(
            split.step, self.loss_fn, self.algorithm, batched=self.batched, strict=self.strict
        )
        return core, split.params, split.to_grads

    def report(self, model: Any, hidden: Any, x: Any) -> CompileReport:
        """The compile report of the model's step (``braintrace.Learner.report``)."""
        core, params, _ = self.core_of(model, "report")
        return core.report(params, hidden, x)

    def init(self, model: Any, hidden: Any, x: Any, *, key: Any = None) -> LearnerState:
        """Zero traces for the initial ``hidden`` (``x``: one step's input, for shapes;
        ``key`` seeds a random algorithm, see ``braintrace.Learner.init``)."""
        core, params, _ = self.core_of(model, "init")
        return core.init(params, hidden, x, key=key)

    def reset(self, state: LearnerState, mask: Any = None, hidden: Any = None) -> LearnerState:
        """Start new episodes: fresh hidden state, zero traces (``braintrace.Learner.reset``)."""
        return self._template.reset(state, mask=mask, hidden=hidden)

    def step(self, model: Any, state: LearnerState, x: Any, target: Any, *, active: Any = None):
        """One time step: ``((loss, out), grads, new_state)`` (``braintrace.Learner.step``)."""
        core, params, to_grads = self.core_of(model, "step")
        result, grads, state = core.step(params, state, x, target, active=active)
        return result, to_grads(grads), state

    def window(self, model: Any, state: LearnerState, xs: Any, targets: Any, *, active: Any = None):
        """One window of ``len(xs)`` time-major steps (``braintrace.Learner.window``)."""
        core, params, to_grads = self.core_of(model, "window")
        result, grads, state = core.window(params, state, xs, targets, active=active)
        return result, to_grads(grads), state

    def scan(
        self,
        model: Any,
        state: LearnerState,
        xs: Any,
        targets: Any,
        window: int | None = None,
        *,
        active: Any = None,
    ):
        """Run over time-major ``xs``/``targets``: ``((losses, outs), grads, state)``.

        ``grads`` sums the per-window gradients (``braintrace.Learner.scan``).
        """
        core, params, to_grads = self.core_of(model, "scan")
        result, grads, state = core.scan(params, state, xs, targets, window=window, active=active)
        return result, to_grads(grads), state
