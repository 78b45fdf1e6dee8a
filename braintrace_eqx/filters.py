"""Which arrays of an Equinox model are trained: the ``trainable`` filter spec."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

__all__ = ["trainable"]


def _frozen_names(node: Any) -> tuple[str, ...]:
    if not isinstance(node, eqx.Module):
        return ()
    return tuple(getattr(type(node), "frozen_fields", ()))


def _false_tree(sub: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: False, sub)


def _module_spec(node: eqx.Module) -> Any:
    spec = jax.tree_util.tree_map(eqx.is_inexact_array, node)
    for name in _frozen_names(node):
        if getattr(node, name) is None:
            continue
        spec = eqx.tree_at(lambda m, n=name: getattr(m, n), spec, replace_fn=_false_tree)
    return spec


def trainable(model: Any) -> Any:
    """Filter spec of the arrays to train: ``eqx.is_inexact_array`` minus frozen fields.

    A module declares frozen fields with a class attribute
    ``frozen_fields: ClassVar[tuple[str, ...]]`` (:class:`braintrace_eqx.ETPLoRA` freezes
    ``base_weight``). Use the spec wherever Equinox takes one::

        params = eqx.filter(model, braintrace_eqx.trainable(model))
        opt_state = optimizer.init(params)

    The braintrace_eqx learner differentiates exactly these leaves, so its
    gradients have the structure of ``params`` above (``None`` elsewhere). For a
    model without frozen fields this is ``eqx.filter(model, eqx.is_inexact_array)``.

    Parameters
    ----------
    model : PyTree
        An Equinox model (any pytree).

    Returns
    -------
    PyTree[bool]
        ``model``'s structure with a bool at every leaf.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> lora = bte.ETPLoRA(3, 4, 2, base_weight=jnp.ones((4, 3)), key=jax.random.PRNGKey(0))
    >>> params = eqx.filter(lora, bte.trainable(lora))
    >>> params.base_weight is None, params.lora_a.shape
    (True, (3, 2))
    """
    return jax.tree_util.tree_map(
        lambda node: _module_spec(node) if _frozen_names(node) else eqx.is_inexact_array(node),
        model,
        is_leaf=lambda node: bool(_frozen_names(node)),
    )
