"""Run stock NNX layers through ETP ops in place: :func:`convert`.

:class:`~braintrace_flax.nnx.ETPLinear` and :class:`~braintrace_flax.nnx.ETPLoRA`
subclass ``nnx.Linear`` and ``nnx.LoRA`` and only change ``__call__``, so a stock
layer becomes its ETP twin by changing its class: the ``Param`` objects, the
attributes and ``nnx.state(model)`` stay exactly as they were, and an existing
``nnx.Optimizer`` (whose state mirrors ``nnx.state``) keeps working.
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

from .conv import ETPConv
from .embed_einsum import ETPEinsum, ETPEmbed, ETPLinearGeneral
from .layers import ETPLinear, ETPLoRA

__all__ = ["convert", "ETP_TWINS"]

M = TypeVar("M", bound=nnx.Module)

#: Stock NNX layer -> its ETP twin (exact types: a user subclass may compute otherwise).
ETP_TWINS: dict[type, type] = {nnx.Linear: ETPLinear, nnx.LoRA: ETPLoRA}
ETP_TWINS[nnx.Conv] = ETPConv
ETP_TWINS[nnx.Embed] = ETPEmbed
ETP_TWINS[nnx.Einsum] = ETPEinsum
ETP_TWINS[nnx.LinearGeneral] = ETPLinearGeneral


def convert(model: M) -> M:
    """Make every stock ``nnx.Linear`` / ``nnx.LoRA`` inside ``model`` run through ETP ops.

    Works on any module graph: stock cells (``nnx.SimpleCell``, ``nnx.GRUCell``,
    ``nnx.LSTMCell``, ``nnx.OptimizedLSTMCell``), ``nnx.RNN``, and user modules,
    including shared layers. Each layer keeps its ``Param`` objects (only its class
    changes, to :class:`ETPLinear` / :class:`ETPLoRA`), so ``nnx.state(model)`` is
    unchanged in structure and values. ``model`` is changed in place and returned.

    Parameters
    ----------
    model : nnx.Module
        The model (or a single layer).

    Returns
    -------
    nnx.Module
        ``model`` itself.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> before = nnx.state(cell)
    >>> cell = btnnx.convert(cell)
    >>> type(cell.dense_h).__name__, nnx.state(cell) == before
    ('ETPLinear', True)
    >>> h, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
    >>> jaxpr = jax.make_jaxpr(lambda h, x: cell(h, x))(h, x)
    >>> sum(e.primitive.name == 'etp_mm' for e in jaxpr.eqns)
    2
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"braintrace_flax.nnx.convert: model must be a flax.nnx.Module, got "
            f"{type(model).__name__}."
        )
    for _, node in nnx.iter_graph(model):
        twin = ETP_TWINS.get(type(node))
        if twin is not None:
            # Same attributes and Params; only __call__ changes (the twin adds no fields).
            object.__setattr__(node, "__class__", twin)
    return model
