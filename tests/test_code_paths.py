"""The accelerators' code path, run on the CPU: ``BRAINTRACE_ACCELERATOR_PATH=1``.

On a CPU the learner loops over the samples for the trace credit of large traces and
materialises the step's factors behind a conditional; elsewhere both are one fused
computation. With the variable set, a CPU takes the accelerators' branches. Each
test runs D-RTRL, pp_prop or windows under both settings: both must match the
oracle (BPTT by ``jax.grad``, float64) where one applies, and each other to 1e-12.
The sizes make the traces large enough (``_LOOP_ELEMENTS``) for the sample loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import collect_primitives

import braintrace as bt
from braintrace import ops
from braintrace.algorithms import relation
from braintrace.backend import ACCELERATOR_PATH_ENV, cpu_code_path
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

B, T, N_IN, N = 8, 7, 32, 64  # a (B, N_IN, N) trace: 16384 elements, the loop's threshold


def _leaky(p, h, x):
    """A leaky tanh layer driven by input only: the exact class, so D-RTRL is BPTT."""
    a = ops.elemwise(p["decay"], jax.nn.sigmoid)
    h = a * h + (1 - a) * jnp.tanh(ops.dense(x, p["w"], p["b"]))
    return h, h @ p["ro"]


def _leaky_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(11))
    return {
        "w": jax.random.normal(k1, (N_IN, N)) / np.sqrt(N_IN),
        "b": jnp.full(N, 0.1),
        "decay": jnp.linspace(-1.0, 2.0, N),
        "ro": jax.random.normal(k2, (N, 2)) / np.sqrt(N),
    }


MODELS = {
    "leaky": (_leaky, _leaky_params),
    "rnn": (M.rnn_step, lambda: M.rnn_params(seed=4, n_in=N_IN, n=N)),
}


def _data(seed=5):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = 0.3 * jax.random.normal(k1, (B, N))
    return hidden, jax.random.normal(k2, (T, B, N_IN)), jax.random.normal(k3, (T, B, 2))


def _run(model, algo, window):
    """A fresh learner and jit (the path is chosen when tracing): ``(losses, grads, state)``."""
    step, make_params = MODELS[model]
    params, (hidden, xs, targets) = make_params(), _data()
    learner = bt.compile(step, M.mse, algo, batched=True)
    state = learner.init(params, hidden, xs[0])
    scan = jax.jit(lambda p, s, x, y: learner.scan(p, s, x, y, window=window))
    (losses, _), grads, state = scan(params, state, xs, targets)
    return losses, grads, state


def _on_both_paths(monkeypatch, run):
    """``run()`` on the CPU path and on the accelerators' path; they agree to 1e-12."""
    monkeypatch.delenv(ACCELERATOR_PATH_ENV, raising=False)
    assert cpu_code_path()
    on_cpu = run()
    monkeypatch.setenv(ACCELERATOR_PATH_ENV, "1")
    assert not cpu_code_path()
    on_accelerator = run()
    monkeypatch.delenv(ACCELERATOR_PATH_ENV)
    for a, b in zip(jax.tree_util.tree_leaves(on_cpu), jax.tree_util.tree_leaves(on_accelerator)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)
    return on_cpu, on_accelerator


def test_the_variable_switches_the_program(monkeypatch):
    """Negative control: the two settings really trace different programs (the CPU one
    holds the conditional and the per-sample loop), on traces this large."""
    step, make_params = MODELS["rnn"]
    params, (hidden, xs, targets) = make_params(), _data()

    def primitives():
        learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
        state = learner.init(params, hidden, xs[0])
        jaxpr = jax.make_jaxpr(learner.step)(params, state, xs[0], targets[0])
        return [p.name for p in collect_primitives(jaxpr)]

    monkeypatch.delenv(ACCELERATOR_PATH_ENV, raising=False)
    on_cpu = primitives()
    monkeypatch.setenv(ACCELERATOR_PATH_ENV, "1")
    on_accelerator = primitives()
    assert "cond" in on_cpu and "cond" not in on_accelerator
    assert on_cpu.count("scan") + on_cpu.count("while") > on_accelerator.count("scan")
    assert relation._LOOP_ELEMENTS <= B * N_IN * N
    monkeypatch.setenv(ACCELERATOR_PATH_ENV, "yes")
    with pytest.raises(ValueError, match="BRAINTRACE_ACCELERATOR_PATH='yes'"):
        cpu_code_path()


def test_d_rtrl_is_bptt_on_both_paths(monkeypatch):
    step, make_params = MODELS["leaky"]
    reference = bptt_grad(step, M.mse, make_params(), *_data(), True)
    for _, grads, state in _on_both_paths(monkeypatch, lambda: _run("leaky", bt.D_RTRL(), 1)):
        for name in reference:
            assert rel_err(grads[name], reference[name]) <= 1e-10, name
        assert bool((state.count == T).all())


@pytest.mark.parametrize(
    "algo, window",
    [
        pytest.param(bt.pp_prop(0.8, warmup_correction=True), 1, id="pp_prop"),
        pytest.param(bt.D_RTRL(), 3, id="d_rtrl-window3", marks=pytest.mark.slow),
        pytest.param(bt.pp_prop(0.8), 3, id="pp_prop-window3", marks=pytest.mark.slow),
    ],
)
def test_pp_prop_and_windows_agree_on_both_paths(monkeypatch, algo, window):
    on_cpu, _ = _on_both_paths(monkeypatch, lambda: _run("rnn", algo, window))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(on_cpu[1]))


@pytest.mark.slow
def test_one_window_is_bptt_on_both_paths(monkeypatch):
    """A window over the whole sequence is BPTT for every algorithm, on both paths."""
    step, make_params = MODELS["rnn"]
    reference = bptt_grad(step, M.mse, make_params(), *_data(), True)
    for _, grads, _ in _on_both_paths(monkeypatch, lambda: _run("rnn", bt.pp_prop(0.8), T)):
        for name in reference:
            assert rel_err(grads[name], reference[name]) <= 1e-10, name
