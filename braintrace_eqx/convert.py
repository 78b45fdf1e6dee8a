"""One-call conversion between Equinox layers and their ETP twins, model-wide."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from .cells import ETPGRUCell, ETPLSTMCell
from .conv import ETPConv, ETPConv1d, ETPConv2d
from .embed import ETPEmbedding
from .layers import ETPLinear

__all__ = ["from_eqx", "to_eqx"]

_TO_ETP = {eqx.nn.Linear: ETPLinear, eqx.nn.GRUCell: ETPGRUCell, eqx.nn.LSTMCell: ETPLSTMCell}
_TO_ETP.update({eqx.nn.Conv: ETPConv, eqx.nn.Conv1d: ETPConv1d, eqx.nn.Conv2d: ETPConv2d})
_TO_ETP[eqx.nn.Embedding] = ETPEmbedding


def _swap(tree: Any, table: dict) -> Any:
    """Replace every node whose exact type is a key of ``table``.

    Exact types only: a user subclass of ``eqx.nn.Linear`` may behave differently.
    """

    def convert(node: Any) -> Any:
        if type(node) not in table:
            return node
        target = table[type(node)]
        return target.from_eqx(node) if target in _TO_ETP.values() else node.to_eqx()

    return jax.tree_util.tree_map(convert, tree, is_leaf=lambda n: type(n) in table)


def from_eqx(model: Any) -> Any:
    """Swap every ``eqx.nn.Linear`` / ``GRUCell`` / ``LSTMCell`` in ``model`` for its
    ETP twin: the same arrays under the same names, shapes and order (the cells'
    fused gate kernels included), now running through ETP ops.

    Parameters
    ----------
    model : PyTree
        A layer or a whole model.

    Returns
    -------
    PyTree
        ``model`` with the layers replaced; everything else is untouched.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> trained = eqx.nn.GRUCell(3, 4, key=jax.random.PRNGKey(0))
    >>> cell = bte.from_eqx(trained)
    >>> same = bool(jnp.all(cell.weight_ih == trained.weight_ih))
    >>> type(cell).__name__, cell.weight_ih.shape, same
    ('ETPGRUCell', (12, 3), True)
    """
    return _swap(model, _TO_ETP)


def to_eqx(model: Any) -> Any:
    """Swap every ETP ``ETPLinear`` / ``ETPGRUCell`` / ``ETPLSTMCell`` in ``model`` back to
    Equinox's (the inverse of :func:`from_eqx`).

    Examples
    --------
    >>> import jax, equinox as eqx, braintrace_eqx as bte
    >>> lin = bte.to_eqx(bte.ETPLinear(3, 4, key=jax.random.PRNGKey(0)))
    >>> isinstance(lin, eqx.nn.Linear)
    True
    """
    return _swap(model, {etp: plain for plain, etp in _TO_ETP.items()})
