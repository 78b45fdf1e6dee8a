"""Tiny step functions with known exactness, for tests and benchmarks.

Every step is ``step(params, hidden, x) -> (new_hidden, out)`` and works for one
sample (``x`` of shape ``(n_in,)``) and for a batch (``x`` of shape ``(B, n_in)``):
:func:`braintrace.ops.dense` binds the unbatched or the batched primitive from
``x``'s rank. Outputs have 2 features, so :func:`mse` against a ``(2,)`` target is
one sample's loss.

Two families, named after the exactness classes of ``docs/algorithms.md``:

- exact class (hidden neurons driven by external input only): :func:`lif_step`,
  :func:`lif_lora_step`, :func:`alif_step`. D-RTRL's summed gradient equals BPTT's.
- approximate class (recurrent weights, stacks, a parameter used twice):
  :func:`rnn_step`, :func:`gru_step`, :func:`rlif_step`, :func:`lif_stack_step`,
  :func:`mixed_lif_step`. D-RTRL and pp_prop approximate BPTT; RTRL is exact.

The default sizes ``N_IN = 3`` inputs and ``N = 4`` neurons keep the tests fast;
the approximate-class factories take ``n_in`` and ``n`` for benchmarks.

Examples
--------
>>> import jax.numpy as jnp
>>> from braintrace.testing import models
>>> params = models.lif_params(seed=0)
>>> hidden = models.hidden_like(("i", "v"), lead=(5,))
>>> new_hidden, out = models.lif_step(params, hidden, jnp.ones((5, models.N_IN)))
>>> new_hidden["v"].shape, out.shape
((5, 4), (5, 2))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import ops
from ..surrogate import spike

__all__ = [
    "N_IN",
    "N",
    "spike",
    "mse",
    "lif_step",
    "lif_lora_step",
    "alif_step",
    "lif_params",
    "lora_params",
    "hidden_like",
    "rnn_step",
    "gru_step",
    "rlif_step",
    "rnn_params",
    "gru_params",
    "rlif_params",
    "lif_stack_step",
    "lif_stack_params",
    "mixed_lif_step",
]

#: Default input features and neurons of the test models.
N_IN, N = 3, 4


def mse(out, target):
    """Summed squared error of ONE sample (the learner vmaps and averages it).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> float(mse(jnp.array([1.0, 2.0]), jnp.zeros(2)))
    5.0
    """
    return jnp.sum((out - target) ** 2)


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


# -- exact class --------------------------------------------------------------------------


def lif_step(p, h, x):
    """2-state LIF: current ``i``, then voltage ``v`` reading this step's ``i``.

    The readout has two paths (``tanh(v)`` and the spike), both plain ``jnp``.
    Parameters: :func:`lif_params`; hidden: ``{"i", "v"}``.
    """
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    i = 0.8 * h["i"] + ops.dense(x, p["w"], p["b"])
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    out = jnp.tanh(v) @ p["ro"] + spike(v - 1.0) @ p["ro"]
    return {"i": i, "v": v}, out


def lif_lora_step(p, h, x):
    """The LIF of :func:`lif_step` driven by a LoRA op over a fixed base kernel.

    The base kernel is a constant closed over by the step (not a parameter).
    Parameters: :func:`lora_params`; hidden: ``{"i", "v"}``.
    """
    base = jnp.linspace(-0.5, 0.5, N_IN * N, dtype=p["lora_a"].dtype).reshape(N_IN, N)
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    y = ops.lora(x, p["lora_a"], p["lora_b"], p["b"], scale=0.7, base_weight=base)
    i = 0.8 * h["i"] + y
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]


def alif_step(p, h, x):
    """3-state adaptive LIF: current, voltage and adaptation, coupled within the step.

    Parameters: :func:`lif_params`; hidden: ``{"i", "v", "a"}``.
    """
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    i = 0.7 * h["i"] + ops.dense(x, p["w"], p["b"])
    v = tau * h["v"] + (1.0 - tau) * i - 0.3 * h["a"]
    s = spike(v - 1.0 - 0.5 * h["a"])
    a = 0.9 * h["a"] + 0.2 * s + 0.1 * jnp.tanh(v)
    return {"i": i, "v": v, "a": a}, jnp.tanh(v) @ p["ro"]


def lif_params(seed=0, dtype=jnp.float64):
    """``{"w" (N_IN, N), "b" (N,), "tau" (N,), "ro" (N, 2)}`` for the LIF models."""
    k = _keys(seed, 3)
    return {
        "w": jax.random.normal(k[0], (N_IN, N), dtype),
        "b": jnp.full((N,), 0.3, dtype),
        "tau": jnp.linspace(-1.0, 1.0, N, dtype=dtype),
        "ro": jax.random.normal(k[1], (N, 2), dtype) * 0.5,
    }


def lora_params(seed=0, dtype=jnp.float64, rank=2):
    """``{"lora_a" (N_IN, rank), "lora_b" (rank, N), "b", "tau", "ro"}`` for the LoRA LIF."""
    k = _keys(seed, 4)
    return {
        "lora_a": jax.random.normal(k[0], (N_IN, rank), dtype),
        "lora_b": jax.random.normal(k[1], (rank, N), dtype),
        "b": jnp.full((N,), 0.2, dtype),
        "tau": jnp.linspace(-1.0, 1.0, N, dtype=dtype),
        "ro": jax.random.normal(k[2], (N, 2), dtype) * 0.5,
    }


def hidden_like(names, lead=(), seed=1, dtype=jnp.float64):
    """A random hidden state ``{name: (*lead, N)}`` (random, so no state starts at 0)."""
    keys = _keys(seed, len(names))
    return {n: jax.random.normal(k, tuple(lead) + (N,), dtype) for n, k in zip(names, keys)}


# -- approximate class --------------------------------------------------------------------


def rnn_step(p, h, x):
    """Tanh RNN whose only recurrence runs through an ETP op (so ``D = 0``).

    Parameters: :func:`rnn_params`; hidden: one array.
    """
    h = jnp.tanh(ops.dense(x, p["wx"], p["b"]) + ops.dense(h, p["wh"]))
    return h, h @ p["ro"]


def gru_step(p, h, x):
    """GRU from ETP dense ops (Flax's convention ``h' = (1 - z) n + z h``).

    Parameters: :func:`gru_params`; hidden: one array.
    """
    r = jax.nn.sigmoid(ops.dense(x, p["wir"], p["br"]) + ops.dense(h, p["whr"]))
    z = jax.nn.sigmoid(ops.dense(x, p["wiz"], p["bz"]) + ops.dense(h, p["whz"]))
    n = jnp.tanh(ops.dense(x, p["win"], p["bn"]) + r * ops.dense(h, p["whn"], p["bhn"]))
    h = (1.0 - z) * n + z * h
    return h, h @ p["ro"]


def rlif_step(p, h, x):
    """Recurrent LIF: input and recurrent spikes through ETP dense ops.

    Parameters: :func:`rlif_params`; hidden: ``{"i", "v"}``.
    """
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    s_prev = spike(h["v"] - 1.0)
    i = 0.8 * h["i"] + ops.dense(x, p["w"], p["b"]) + ops.dense(s_prev, p["wr"])
    v = tau * h["v"] * (1.0 - s_prev) + (1.0 - tau) * i
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]


def rnn_params(seed=0, n_in=N_IN, n=N, dtype=jnp.float64):
    """``{"wx", "wh", "b", "ro"}`` for :func:`rnn_step` (recurrent gain 0.9)."""
    k = _keys(seed, 4)
    return {
        "wx": jax.random.normal(k[0], (n_in, n), dtype) / jnp.sqrt(n_in),
        "wh": jax.random.normal(k[1], (n, n), dtype) * 0.9 / jnp.sqrt(n),
        "b": jnp.zeros((n,), dtype),
        "ro": jax.random.normal(k[2], (n, 2), dtype) / jnp.sqrt(n),
    }


def gru_params(seed=0, n_in=N_IN, n=N, dtype=jnp.float64):
    """Input kernels ``wi{r,z,n}``, recurrent ``wh{r,z,n}``, biases and ``ro``."""
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
    """``{"w", "b", "wr", "tau", "ro"}`` for :func:`rlif_step`."""
    k = _keys(seed, 3)
    return {
        "w": jax.random.normal(k[0], (n_in, n), dtype) * 2.0 / jnp.sqrt(n_in),
        "b": jnp.full((n,), 0.5, dtype),
        "wr": jax.random.normal(k[1], (n, n), dtype) / jnp.sqrt(n),
        "tau": jnp.linspace(0.5, 2.0, n, dtype=dtype),
        "ro": jax.random.normal(k[2], (n, 2), dtype) / jnp.sqrt(n),
    }


def _lif_layer(h, y, tau):
    """One LIF layer of :func:`lif_stack_step`: current, then voltage with a spike reset."""
    i = 0.8 * h["i"] + y
    v = tau * h["v"] * (1.0 - spike(h["v"] - 1.0)) + (1.0 - tau) * i
    return {"i": i, "v": v}


def lif_stack_step(p, h, x):
    """An input ``Dense`` (ETP op, tanh) in front of two stacked LIF layers.

    Layer 2 reads layer 1's spikes; D-RTRL's gradient of the input layer is
    truncated and layer 1's approximate. Parameters: :func:`lif_stack_params`;
    hidden: ``{"l1": {"i", "v"}, "l2": {"i", "v"}}``.
    """
    u = jnp.tanh(ops.dense(x, p["win"], p["bin"]))
    l1 = _lif_layer(
        h["l1"], ops.dense(u, p["w1"], p["b1"]), ops.elemwise(p["tau1"], jax.nn.sigmoid)
    )
    s1 = spike(l1["v"] - 0.5)
    l2 = _lif_layer(
        h["l2"], ops.dense(s1, p["w2"], p["b2"]), ops.elemwise(p["tau2"], jax.nn.sigmoid)
    )
    return {"l1": l1, "l2": l2}, jnp.tanh(l2["v"]) @ p["ro"]


def lif_stack_params(seed=0, n_in=N_IN, n=N, dtype=jnp.float64):
    """Input layer ``win``/``bin``, layers ``w1, b1, tau1`` and ``w2, b2, tau2``, readout ``ro``."""
    k = _keys(seed, 4)
    return {
        "win": jax.random.normal(k[0], (n_in, n), dtype),
        "bin": jnp.full((n,), 0.1, dtype),
        "w1": jax.random.normal(k[1], (n, n), dtype) * 1.5 / jnp.sqrt(n),
        "b1": jnp.full((n,), 0.6, dtype),
        "tau1": jnp.linspace(-1.0, 1.0, n, dtype=dtype),
        "w2": jax.random.normal(k[2], (n, n), dtype) * 1.5 / jnp.sqrt(n),
        "b2": jnp.full((n,), 0.6, dtype),
        "tau2": jnp.linspace(1.0, -1.0, n, dtype=dtype),
        "ro": jax.random.normal(k[3], (n, 2), dtype) / jnp.sqrt(n),
    }


def mixed_lif_step(p, h, x):
    """The LIF of :func:`lif_step` whose ``tau`` also reaches ``v`` through plain ``jnp``.

    Parameters: :func:`lif_params`; hidden: ``{"i", "v"}``.
    """
    tau = ops.elemwise(p["tau"], jax.nn.sigmoid)
    i = 0.8 * h["i"] + ops.dense(x, p["w"], p["b"])
    v = tau * h["v"] + (1.0 - tau) * i + 0.3 * p["tau"] * h["v"]
    return {"i": i, "v": v}, jnp.tanh(v) @ p["ro"]
