"""From a linen module to braintrace's online learner.

The step the core sees is ``step(params, carry, x) = module.apply({'params': params,
**constants}, carry, x, method=method) -> (carry, out)``; ``params`` is
``variables['params']`` and the gradients the learner returns have its structure, so
an optax optimizer consumes them unchanged. For an ``nn.RNN`` the step is its cell's,
on ``params['cell']``, and sequences keep the RNN's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

import braintrace as bt

from ._sequence import SequenceLearner, check_rnn_options, time_axis
from .convert import etp_dense_calls

__all__ = ["compile", "make_step"]


def _check_module(module: Any, who: str) -> None:
    if isinstance(module, type) and issubclass(module, nn.Module):
        raise TypeError(
            f"{who}: pass a module instance, e.g. {module.__name__}(features=...), not the class."
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: module must be a flax.linen.Module, got {type(module).__name__}.")
    if module.scope is not None:
        raise ValueError(
            f"{who}: {type(module).__name__} is bound to variables; pass the unbound module "
            "(the one you called .init on), the learner supplies params at every step."
        )


def _constants(constants: Mapping | None, who: str) -> dict:
    if constants is None:
        return {}
    if not isinstance(constants, Mapping):
        raise TypeError(
            f"{who}: constants must be a mapping of variable collections, e.g. "
            f"{{'frozen': variables['frozen']}}, got {type(constants).__name__}."
        )
    return {k: v for k, v in constants.items() if k != "params"}


def make_step(
    module: nn.Module,
    *,
    convert_dense: bool = False,
    method: str | Callable | None = None,
    constants: Mapping | None = None,
) -> Callable:
    """The step function ``step(params, carry, x) -> (carry, out)`` of a linen module.

    Parameters
    ----------
    module : flax.linen.Module
        An unbound module whose ``method`` maps ``(carry, x)`` to ``(carry, out)``, or
        an ``nn.RNN``: the step is then its cell's, on ``params['cell']``.
    convert_dense : bool
        Run every stock ``nn.Dense`` (and ``nn.OptimizedLSTMCell``) through ETP ops
        (see :func:`braintrace_flax.etp_dense_calls`).
    method : str or callable, optional
        The module method to apply (default ``__call__``).
    constants : mapping, optional
        Variable collections other than ``'params'`` (e.g. ``'frozen'`` for a LoRA
        base kernel), passed to every ``apply``; a ``'params'`` entry is ignored, so the
        whole ``variables`` tree may be passed.

    Returns
    -------
    callable
        ``step(params, carry, x)``; usable by ``braintrace.compile`` and by a BPTT
        oracle (``lax.scan`` over it).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import make_step
    >>> cell = nn.GRUCell(4)
    >>> h, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
    >>> params = cell.init(jax.random.key(0), h, x)['params']
    >>> step = make_step(cell, convert_dense=True)
    >>> step(params, h, x)[0].shape
    (2, 4)
    """
    _check_module(module, "braintrace_flax.make_step")
    extra = _constants(constants, "braintrace_flax.make_step")
    if isinstance(module, nn.RNN):
        if method is not None:
            raise ValueError(
                "braintrace_flax: an nn.RNN is trained through its cell's __call__; leave "
                "method=None (or compile a module that calls the cell as you need)."
            )
        return _cell_step(module, convert_dense, extra)

    def step(params, carry, x):
        variables = {"params": params, **extra}
        if convert_dense:
            with etp_dense_calls():
                return module.apply(variables, carry, x, method=method)
        return module.apply(variables, carry, x, method=method)

    return step


def _cell_step(rnn: nn.RNN, convert_dense: bool, constants: dict) -> Callable:
    """The step of an ``nn.RNN``'s cell on the RNN's ``params`` (the cell's are under 'cell')."""
    check_rnn_options(rnn, "braintrace_flax.compile")
    cell_constants = {k: v["cell"] for k, v in constants.items() if "cell" in v}
    cell = make_step(
        rnn.cell.clone(parent=None), convert_dense=convert_dense, constants=cell_constants
    )

    def step(params, carry, x):
        return cell(params["cell"], carry, x)

    return step


def compile(  # noqa: A001 - mirrors braintrace.compile
    module: nn.Module,
    loss_fn: Callable,
    algorithm: bt.Algorithm,
    *,
    batched: bool = True,
    strict: bool = False,
    convert_dense: bool = False,
    method: str | Callable | None = None,
    constants: Mapping | None = None,
) -> bt.Learner | SequenceLearner:
    """Compile a linen recurrent module and a loss into an online learner.

    Parameters
    ----------
    module : flax.linen.Module
        Unbound; ``module.apply({'params': params}, carry, x) -> (carry, out)``. Or an
        ``nn.RNN``: its cell is trained, and ``scan``/``window`` take and return
        sequences in the RNN's layout (batch-major unless ``time_major=True``).
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    algorithm : braintrace.Algorithm
        ``braintrace.D_RTRL()``, ``braintrace.pp_prop(...)`` or ``braintrace.BPTT()``.
    batched : bool
        ``True`` (the default in every face): ``x``, every carry leaf and ``target``
        have a leading batch axis; the per-step loss is the batch mean of ``loss_fn``.
    strict : bool
        Raise instead of warning when a parameter's gradient would be truncated.
    convert_dense : bool
        Reroute stock ``nn.Dense`` layers through the ETP dense op (same params), so
        ``nn.SimpleCell``, ``nn.GRUCell``, ``nn.LSTMCell``, ``nn.MGUCell`` and
        ``nn.OptimizedLSTMCell`` learn online unchanged; stock ``nn.Embed``,
        ``nn.Einsum`` and ``nn.DenseGeneral`` go through the embedding and einsum ops.
    method : str or callable, optional
        The module method to apply (default ``__call__``).
    constants : mapping, optional
        Non-trainable collections (e.g. ``variables`` with a ``'frozen'`` LoRA base);
        see :func:`make_step`.

    Returns
    -------
    braintrace.Learner
        ``init(params, carry, x)``, ``step(params, state, x, target)``,
        ``scan(params, state, xs, targets, window=None)``, ``window(...)``,
        ``reset(state, ...)`` and ``report(params, carry, x)``, with
        ``params = variables['params']``; ``grads`` has ``params``' structure. For an
        ``nn.RNN``, a :class:`~braintrace_flax.SequenceLearner` around it.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, braintrace as bt
    >>> import braintrace_flax as btf
    >>> cell = nn.GRUCell(4)
    >>> h, x, y = jnp.zeros((2, 4)), jnp.ones((2, 3)), jnp.zeros((2, 4))
    >>> params = cell.init(jax.random.key(0), h, x)['params']
    >>> mse = lambda out, target: jnp.sum((out - target) ** 2)
    >>> learner = btf.compile(cell, mse, bt.D_RTRL(), convert_dense=True)
    >>> learner.report(params, h, x).param("['ir']['kernel']").mode
    'trace'
    >>> opt = optax.adam(1e-2)
    >>> opt_state = opt.init(params)
    >>> state = learner.init(params, h, x)
    >>> (loss, out), grads, state = jax.jit(learner.step)(params, state, x, y)
    >>> updates, opt_state = opt.update(grads, opt_state)
    >>> params = optax.apply_updates(params, updates)
    """
    step = make_step(module, convert_dense=convert_dense, method=method, constants=constants)
    learner = bt.compile(step, loss_fn, algorithm, batched=batched, strict=strict)
    if isinstance(module, nn.RNN):
        return SequenceLearner(learner, time_axis(module.time_major, batched))
    return learner
