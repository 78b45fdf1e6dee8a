"""Small models shared by the compiler and algorithm tests.

Every step is ``step(params, hidden, x) -> (new_hidden, out)`` and works for one
sample (``x`` of shape ``(in,)``) and for a batch (``x`` of shape ``(B, in)``):
``ops.dense`` binds the unbatched or batched primitive from ``x``'s rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from braintrace import ops

N_IN, N = 3, 4


@jax.custom_jvp
def spike(v):
    """Heaviside spike with a smooth (fast-sigmoid) surrogate derivative."""
    return (v > 0).astype(v.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    return spike(v), dv / (1.0 + 4.0 * jnp.abs(v)) ** 2


def mse(out, target):
    return jnp.sum((out - target) ** 2)


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# -- exact class ------------------------------------------------------------------------


def lif_step(p, h, x):
    """2-state LIF: current ``i`` then voltage ``v`` reading this step's ``i``."""
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    i = 0.8 * h["i"] + ops.dense(x, p["w"], p["b"])
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    out = jnp.tanh(v) @ p["ro"] + spike(v - 1.0) @ p["ro"]
    return {"i": i, "v": v}, out


def lif_lora_step(p, h, x):
    """The LIF driven by a LoRA op over a frozen base kernel (closed over)."""
    base = jnp.linspace(-0.5, 0.5, N_IN * N, dtype=p["lora_a"].dtype).reshape(N_IN, N)
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    y = ops.lora(x, p["lora_a"], p["lora_b"], p["b"], scale=0.7, base_weight=base)
    i = 0.8 * h["i"] + y
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]


def alif_step(p, h, x):
    """3-state adaptive LIF: current, voltage and adaptation, coupled within the step."""
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    i = 0.7 * h["i"] + ops.dense(x, p["w"], p["b"])
    v = tau * h["v"] + (1.0 - tau) * i - 0.3 * h["a"]
    s = spike(v - 1.0 - 0.5 * h["a"])
    a = 0.9 * h["a"] + 0.2 * s + 0.1 * jnp.tanh(v)
    return {"i": i, "v": v, "a": a}, jnp.tanh(v) @ p["ro"]


def lif_params(seed=0, dtype=jnp.float64):
    k = _keys(seed, 3)
    return {
        "w": jax.random.normal(k[0], (N_IN, N), dtype),
        "b": jnp.full((N,), 0.3, dtype),
        "tau": jnp.linspace(-1.0, 1.0, N, dtype=dtype),
        "ro": jax.random.normal(k[1], (N, 2), dtype) * 0.5,
    }


def lora_params(seed=0, dtype=jnp.float64, rank=2):
    k = _keys(seed, 4)
    return {
        "lora_a": jax.random.normal(k[0], (N_IN, rank), dtype),
        "lora_b": jax.random.normal(k[1], (rank, N), dtype),
        "b": jnp.full((N,), 0.2, dtype),
        "tau": jnp.linspace(-1.0, 1.0, N, dtype=dtype),
        "ro": jax.random.normal(k[2], (N, 2), dtype) * 0.5,
    }


def hidden_like(names, lead=(), seed=1, dtype=jnp.float64):
    keys = _keys(seed, len(names))
    return {n: jax.random.normal(k, lead + (N,), dtype) for n, k in zip(names, keys)}


# -- approximate class -------------------------------------------------------------------


def rnn_step(p, h, x):
    """Tanh RNN whose only recurrence runs through an ETP op (``D = 0``)."""
    h = jnp.tanh(ops.dense(x, p["wx"], p["b"]) + ops.dense(h, p["wh"]))
    return h, h @ p["ro"]


def gru_step(p, h, x):
    """GRU from ETP dense ops (Flax's convention ``h' = (1 - z) n + z h``)."""
    r = jax.nn.sigmoid(ops.dense(x, p["wir"], p["br"]) + ops.dense(h, p["whr"]))
    z = jax.nn.sigmoid(ops.dense(x, p["wiz"], p["bz"]) + ops.dense(h, p["whz"]))
    n = jnp.tanh(ops.dense(x, p["win"], p["bn"]) + r * ops.dense(h, p["whn"], p["bhn"]))
    h = (1.0 - z) * n + z * h
    return h, h @ p["ro"]


def rlif_step(p, h, x):
    """Recurrent LIF: input and recurrent spikes through ETP dense ops."""
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    s_prev = spike(h["v"] - 1.0)
    i = 0.8 * h["i"] + ops.dense(x, p["w"], p["b"]) + ops.dense(s_prev, p["wr"])
    v = tau * h["v"] * (1.0 - s_prev) + (1.0 - tau) * i
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]


def rnn_params(seed=0, n_in=N_IN, n=N, dtype=jnp.float64):
    k = _keys(seed, 4)
    return {
        "wx": jax.random.normal(k[0], (n_in, n), dtype) / jnp.sqrt(n_in),
        "wh": jax.random.normal(k[1], (n, n), dtype) * 0.9 / jnp.sqrt(n),
        "b": jnp.zeros((n,), dtype),
        "ro": jax.random.normal(k[2], (n, 2), dtype) / jnp.sqrt(n),
    }


def gru_params(seed=0, n_in=N_IN, n=N, dtype=jnp.float64):
    k = _keys(seed, 8)
    sx, sh = 1.0 / jnp.sqrt(n_in), 1.0 / jnp.sqrt(n)
    p = {}
    for j, g in enumerate("rzn"):
        p["wi" + g] = jax.random.normal(k[j], (n_in, n), dtype) * sx
        p["wh" + g] = jax.random.normal(k[3 + j], (n, n), dtype) * sh
        p["b" + g] = jnp.zeros((n,), dtype)
    p["bhn"] = jnp.zeros((n,), dtype)
    p["ro"] = jax.random.normal(k[6], (n, 2), dtype) * sh
    return p


def rlif_params(seed=0, n_in=N_IN, n=N, dtype=jnp.float64):
    k = _keys(seed, 3)
    return {
        "w": jax.random.normal(k[0], (n_in, n), dtype) * 2.0 / jnp.sqrt(n_in),
        "b": jnp.full((n,), 0.5, dtype),
        "wr": jax.random.normal(k[1], (n, n), dtype) / jnp.sqrt(n),
        "tau": jnp.linspace(0.5, 2.0, n, dtype=dtype),
        "ro": jax.random.normal(k[2], (n, 2), dtype) / jnp.sqrt(n),
    }
