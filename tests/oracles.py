"""Independent references for the learner tests: BPTT by ``jax.grad`` and comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def bptt_grad(step, loss_fn, params, hidden, xs, targets, batched):
    """Gradient of ``sum_t l_t`` through ``lax.scan`` (the batch mean per step when batched)."""

    def total(p):
        def body(h, inputs):
            x, target = inputs
            h, out = step(p, h, x)
            if batched:
                loss = jax.vmap(loss_fn)(out, target).mean()
            else:
                loss = loss_fn(out, target)
            return h, loss

        _, losses = lax.scan(body, hidden, (xs, targets))
        return losses.sum()

    return jax.grad(total)(params)


def one_step_grad(step, loss_fn, params, hidden, xs, targets, batched):
    """``sum_t dl_t/dparams`` with ``h^{t-1}`` held fixed (truncated BPTT with k = 1)."""

    def body(carry, inputs):
        h, acc = carry
        x, target = inputs

        def loss_of(p):
            new_h, out = step(p, h, x)
            if batched:
                return jax.vmap(loss_fn)(out, target).mean(), new_h
            return loss_fn(out, target), new_h

        g, new_h = jax.grad(loss_of, has_aux=True)(params)
        return (new_h, jax.tree_util.tree_map(jnp.add, acc, g)), None

    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    (_, grads), _ = lax.scan(body, (hidden, zero), (xs, targets))
    return grads


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (``b`` the reference; both non-zero is asserted)."""
    scale = float(jnp.abs(b).max())
    assert scale > 0, "reference gradient is zero: the comparison would prove nothing"
    return float(jnp.abs(a - b).max()) / scale


def flat(tree, skip=()):
    return jnp.concatenate(
        [jnp.ravel(v) for k, v in sorted(tree.items()) if k not in skip]
    )


def cosine(a, b) -> float:
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def alignment(g, ref, skip=()):
    """Cosine, sign agreement and norm ratio of two gradient dicts (``ref``: BPTT)."""
    a, b = flat(g, skip), flat(ref, skip)
    return {
        "cosine": cosine(a, b),
        "sign": float(jnp.mean(jnp.sign(a) == jnp.sign(b))),
        "norm_ratio": float(jnp.linalg.norm(a) / jnp.linalg.norm(b)),
    }
