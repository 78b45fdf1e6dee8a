"""Independent gradient references and the metrics that compare gradients with them.

These functions never touch the learner: :func:`bptt_grad` differentiates the
summed loss through ``lax.scan`` with ``jax.grad`` (the exact gradient every online
algorithm is measured against) and :func:`one_step_grad` sums the per-step
gradients with the previous hidden state held fixed (truncated BPTT with ``k = 1``,
what a learner without traces returns). :func:`alignment` reports how closely a
gradient follows a reference: cosine similarity, sign agreement and norm ratio.

The loss convention is the learner's (``docs/algorithms.md``, "The learning
signal"): ``loss_fn(out, target)`` is one sample's loss; with ``batched=True`` the
per-step loss is its mean over the leading batch axis, and the sequence loss is the
sum over steps.

Examples
--------
>>> import jax.numpy as jnp
>>> from braintrace.testing import reference
>>> step = lambda p, h, x: (jnp.tanh(p["w"] * h + x), h * p["r"])  # one-unit RNN
>>> loss = lambda out, y: (out - y) ** 2
>>> params = {"w": jnp.array(0.8), "r": jnp.array(1.5)}
>>> args = (params, jnp.array(0.3), jnp.ones(4), jnp.zeros(4))
>>> full = reference.bptt_grad(step, loss, *args)
>>> short = reference.one_step_grad(step, loss, *args)
>>> float(short["r"]) == float(full["r"])  # the readout's gradient is exact either way
True
>>> bool(abs(float(short["w"])) < abs(float(full["w"])))  # w's credit needs the past
True
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["bptt_grad", "one_step_grad", "flat", "cosine", "alignment"]

_tree_map = jax.tree_util.tree_map


def _step_loss(loss_fn: Callable, out, target, batched: bool):
    """One step's loss: ``loss_fn`` for one sample, its batch mean when ``batched``."""
    if batched:
        return jax.vmap(loss_fn)(out, target).mean()
    return loss_fn(out, target)


def bptt_grad(
    step: Callable, loss_fn: Callable, params, hidden, xs, targets, batched: bool = False
):
    """Gradient of ``L = sum_t l_t`` by ``jax.grad`` through ``lax.scan`` (exact BPTT).

    Parameters
    ----------
    step : callable
        ``step(params, hidden, x) -> (new_hidden, out)``.
    loss_fn : callable
        ``loss_fn(out, target) -> scalar`` for one sample.
    params, hidden : pytree
        The parameters and the hidden state before the first step.
    xs, targets : pytree
        Time-major inputs and targets (leading axis ``T``).
    batched : bool
        Whether ``out`` and ``target`` carry a leading batch axis (the loss is then
        the batch mean per step).

    Returns
    -------
    pytree
        ``dL/dparams``, shaped like ``params``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> step = lambda p, h, x: (p["a"] * h + x, h)
    >>> loss = lambda out, y: out ** 2
    >>> g = bptt_grad(step, loss, {"a": jnp.array(0.5)}, jnp.array(1.0),
    ...               jnp.zeros(3), jnp.zeros(3))
    >>> float(g["a"])  # L = 1 + a^2 + a^4, dL/da = 2a + 4a^3
    1.5
    """

    def total(p):
        def body(h, inputs):
            x, target = inputs
            h, out = step(p, h, x)
            return h, _step_loss(loss_fn, out, target, batched)

        _, losses = lax.scan(body, hidden, (xs, targets))
        return losses.sum()

    return jax.grad(total)(params)


def one_step_grad(
    step: Callable, loss_fn: Callable, params, hidden, xs, targets, batched: bool = False
):
    """``sum_t dl_t/dparams`` with ``h^{t-1}`` held fixed: truncated BPTT with ``k = 1``.

    Same arguments as :func:`bptt_grad`. This is what every algorithm returns for
    a parameter that no trace covers, and what ``braintrace.OneStep`` sums.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> step = lambda p, h, x: (p["a"] * h + x, h)
    >>> loss = lambda out, y: out ** 2
    >>> g = one_step_grad(step, loss, {"a": jnp.array(0.5)}, jnp.array(1.0),
    ...                   jnp.zeros(3), jnp.zeros(3))
    >>> float(g["a"])  # out^t = h^{t-1} does not depend on a once h^{t-1} is fixed
    0.0
    """

    def body(carry, inputs):
        h, acc = carry
        x, target = inputs

        def loss_of(p):
            new_h, out = step(p, h, x)
            return _step_loss(loss_fn, out, target, batched), new_h

        g, new_h = jax.grad(loss_of, has_aux=True)(params)
        return (new_h, _tree_map(jnp.add, acc, g)), None

    zero = _tree_map(jnp.zeros_like, params)
    (_, grads), _ = lax.scan(body, (hidden, zero), (xs, targets))
    return grads


def flat(tree, skip=()) -> jax.Array:
    """All leaves of ``tree`` raveled into one vector; ``skip``: top-level dict keys to leave out.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> flat({"a": jnp.ones((2, 2)), "b": jnp.zeros(3)}, skip=("b",)).shape
    (4,)
    """
    if isinstance(tree, dict):
        tree = {k: v for k, v in tree.items() if k not in skip}
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def cosine(a, b) -> float:
    """Cosine similarity of two arrays (or pytrees of the same structure).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> cosine(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]))  # doctest: +ELLIPSIS
    0.7071...
    """
    a, b = flat(a), flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def alignment(grads, ref, skip=()) -> dict:
    """How closely ``grads`` follows the reference ``ref`` (e.g. BPTT's gradient).

    Parameters
    ----------
    grads, ref : pytree
        Two gradients of the same structure.
    skip : tuple of str
        Top-level dict keys to leave out (e.g. a readout that every algorithm gets
        exactly, which would inflate the agreement).

    Returns
    -------
    dict
        ``cosine`` (1 = same direction), ``sign`` (fraction of entries with the same
        sign) and ``norm_ratio`` (``|grads| / |ref|``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> g = {"w": jnp.array([1.0, -2.0]), "ro": jnp.array([5.0])}
    >>> ref = {"w": jnp.array([2.0, -4.0]), "ro": jnp.array([-5.0])}
    >>> {k: round(v, 6) for k, v in alignment(g, ref, skip=("ro",)).items()}
    {'cosine': 1.0, 'sign': 1.0, 'norm_ratio': 0.5}
    """
    a, b = flat(grads, skip), flat(ref, skip)
    return {
        "cosine": cosine(a, b),
        "sign": float(jnp.mean(jnp.sign(a) == jnp.sign(b))),
        "norm_ratio": float(jnp.linalg.norm(a) / jnp.linalg.norm(b)),
    }
