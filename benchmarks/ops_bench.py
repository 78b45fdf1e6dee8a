"""``bench.py --ops``: each ETP op's D-RTRL and pp_prop step against BPTT.

One small model per op, the op driving a leaky membrane directly (the exact class),
``h = 0.9 h + op(x)`` with a plain readout, batched, float32, all in one process. For
each model and algorithm it times ``jax.jit(learner.scan)`` over ``T`` steps (after a
warm-up, interleaved repeats, median) and reads the trace bytes per sample from the
compile report. Ops that are not in this checkout are skipped (each is imported
guarded), so the script runs either way.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import braintrace as bt
from braintrace import ops

ALGORITHMS = {"bptt": bt.BPTT(), "d_rtrl": bt.D_RTRL(), "pp_prop": bt.pp_prop(0.9)}
N_IN, N_OUT, VOCAB = 64, 128, 100


def _normal(key, shape, scale):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32) * scale


def _leaky(op):
    """``step(p, h, x)``: a leaky membrane driven by ``op(p, x)``, a plain readout."""

    def step(p, h, x):
        h = 0.9 * h + op(p, x)
        return h, h.reshape(h.shape[0], -1) @ p["ro"]

    return step


def _sparse_pattern(seed=0, density=0.1):
    rng = np.random.default_rng(seed)
    flat = rng.choice(N_IN * N_OUT, int(density * N_IN * N_OUT), replace=False)
    return np.stack(np.unravel_index(np.sort(flat), (N_IN, N_OUT)), axis=1)


def _dense_like(batch):
    """dense, grouped and sparse: ``(B, 64) -> (B, 128)``."""
    pattern = _sparse_pattern()
    x = (batch, N_IN)
    return {
        "dense": (
            lambda p, x: ops.dense(x, p["w"], p["b"]),
            {"w": (N_IN, N_OUT), "b": (N_OUT,)},
            x,
            (N_OUT,),
        ),
        "grouped": (
            lambda p, x: ops.grouped_dense(x, p["w"], p["b"]),
            {"w": (4, N_IN // 4, N_OUT // 4), "b": (N_OUT,)},
            x,
            (N_OUT,),
        ),
        "sparse": (  # no bias: its D-RTRL trace is the non-zeros' alone
            lambda p, x: ops.sparse_dense(x, p["w"], pattern, (N_IN, N_OUT)),
            {"w": (len(pattern),)},
            x,
            (N_OUT,),
        ),
    }


def _others(batch):
    """conv, embed and einsum, where this checkout has them."""
    cases = {}
    if hasattr(ops, "conv"):  # 8x8 frames, 2 channels, stride 2, SAME -> (4, 4, 16)
        conv = lambda p, x: ops.conv(x, p["w"], p["b"], strides=2, padding="SAME")  # noqa: E731
        weights = {"w": (3, 3, 2, 16), "b": (16,)}
        cases["conv"] = (conv, weights, (batch, 8, 8, 2), (4, 4, 16))
    if hasattr(ops, "embed"):  # one id per sample and step
        embed = lambda p, x: ops.embed(x, p["w"])  # noqa: E731
        cases["embed"] = (embed, {"w": (VOCAB, N_OUT)}, (batch,), (N_OUT,))
    if hasattr(ops, "einsum"):  # 4 tokens of 16 features, a shared (16, 32) weight
        ein = lambda p, x: ops.einsum("bli,io->blo", x, p["w"], p["b"])  # noqa: E731
        cases["einsum"] = (ein, {"w": (16, 32), "b": (32,)}, (batch, 4, 16), (4, 32))
    return cases


def _problem(case, t):
    """(step, params, hidden, xs, targets) for one case."""
    op, weights, x_shape, y_shape = case
    params = {"w": _normal(1, weights["w"], 1.0 / np.sqrt(np.prod(weights["w"][:-1]) or 8))}
    if "b" in weights:
        params["b"] = jnp.zeros(weights["b"], jnp.float32)
    params["ro"] = _normal(9, (int(np.prod(y_shape)), 2), 0.05)
    batch = x_shape[0]
    if len(x_shape) == 1:  # ids
        xs = jax.random.randint(jax.random.PRNGKey(3), (t,) + x_shape, 0, VOCAB)
    else:
        xs = _normal(3, (t,) + x_shape, 1.0)
    hidden = jnp.zeros((batch,) + y_shape, jnp.float32)
    targets = _normal(4, (t, batch, 2), 1.0)
    return _leaky(op), params, hidden, xs, targets


def _time_case(case, t, repeats) -> dict:
    step, params, hidden, xs, targets = _problem(case, t)
    mse = lambda out, y: jnp.sum((out - y) ** 2)  # noqa: E731
    runs, trace_bytes = {}, {}
    for name, algo in ALGORITHMS.items():
        learner = bt.compile(step, mse, algo, batched=True)
        if name != "bptt":
            trace_bytes[name] = dict(learner.report(params, hidden, xs[0]).trace_memory)[algo.name]
        state = learner.init(params, hidden, xs[0])
        runs[name] = (jax.jit(learner.scan), (params, state, xs, targets))
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    samples = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved: load drifts hit every algorithm alike
        for name, (fn, args) in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    ms = {k: statistics.median(v) / t * 1e3 for k, v in samples.items()}
    return {
        "ms_per_step": {k: round(v, 4) for k, v in ms.items()},
        "d_rtrl_over_bptt": round(ms["d_rtrl"] / ms["bptt"], 2),
        "pp_prop_over_bptt": round(ms["pp_prop"] / ms["bptt"], 2),
        "trace_bytes_per_sample": trace_bytes,
    }


def run_ops(batch: int, t: int, repeats: int) -> dict:
    """Time every available op's model; print the table; return the rows by op."""
    cases = {**_dense_like(batch), **_others(batch)}
    result = {name: _time_case(case, t, repeats) for name, case in cases.items()}
    nnz = len(_sparse_pattern())
    result["sparse"]["d_rtrl_trace_over_nnz"] = round(
        result["sparse"]["trace_bytes_per_sample"]["d_rtrl"] / (nnz * 1 * 4), 3
    )
    header = f"{'op':<8}{'bptt ms':>9}{'d_rtrl':>9}{'pp_prop':>9}{'dr/bptt':>9}{'pp/bptt':>9}"
    header += f"{'d_rtrl B/sample':>17}{'pp B/sample':>13}"
    print(f"ops (B={batch}, T={t}, float32, ms per step; trace bytes per sample)")
    print(header)
    print("-" * len(header))
    for name, r in result.items():
        ms, tb = r["ms_per_step"], r["trace_bytes_per_sample"]
        print(
            f"{name:<8}{ms['bptt']:>9.3f}{ms['d_rtrl']:>9.3f}{ms['pp_prop']:>9.3f}"
            f"{r['d_rtrl_over_bptt']:>9.2f}{r['pp_prop_over_bptt']:>9.2f}"
            f"{tb['d_rtrl']:>17,}{tb['pp_prop']:>13,}"
        )
    print(
        f"sparse: nnz={nnz}, D-RTRL trace / (nnz x S x 4 B) = "
        f"{result['sparse']['d_rtrl_trace_over_nnz']}"
    )
    return result
