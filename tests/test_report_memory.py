"""The compile report's trace memory per op: it adds up to the algorithm's total and
matches the traces' shapes (closed form)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import braintrace as bt
from braintrace import ops

N_IN, N, B = 3, 5, 4
F = jnp.zeros(()).dtype.itemsize  # float64 in the suite


def step(p, h, x):
    h = 0.9 * h + ops.dense(x, p["w"]) + ops.elemwise(p["g"], jnp.tanh) * x.sum(-1, keepdims=True)
    return h, h


def _report(algorithm):
    params = {"w": jnp.zeros((N_IN, N)), "g": jnp.zeros(N)}
    learner = bt.compile(step, lambda o, y: jnp.sum((o - y) ** 2), algorithm)
    return learner.report(params, jnp.zeros((B, N)), jnp.zeros((B, N_IN)))


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        (bt.D_RTRL(), {0: N_IN * N * F, 1: N * F}),  # weight-shaped, S = 1
        (bt.ES_D_RTRL(), {0: (N_IN + N) * F, 1: N * F}),  # x and y sized; no input: exact
    ],
    ids=["d_rtrl", "pp_prop"],
)
def test_per_op_bytes_match_the_traces_and_add_up(algorithm, expected):
    report = _report(algorithm)
    assert dict(report.op_trace_memory) == expected
    assert sum(expected.values()) == report.trace_memory[0][1]
    assert "trace/sample" in str(report)


def test_rtrl_has_no_per_op_figure():
    report = _report(bt.RTRL())
    assert report.op_trace_memory == () and "trace/sample" not in str(report)
    assert report.trace_memory[0][1] > 0
