"""The long-range example: its task, the claims its docstring makes, and its runs.

The in-process checks run in float64 (this suite's conftest) on tiny shapes against
the BPTT oracle (``braintrace.testing.reference.bptt_grad``): the model is in the
exact class, so D-RTRL windows give BPTT's gradient, while truncated BPTT gives the
cue weights exactly nothing. The ``--quick`` run starts a fresh interpreter, as a user
would (float32); the run that pins the accuracy gap is behind the ``slow`` marker.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_example, run_example

import braintrace as bt
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

ROWS = {"tbptt", "d_rtrl", "d_rtrl_window", "bptt"}
ROW_KEYS = {"test_accuracy", "seconds", "temp_MiB"}


@pytest.fixture(scope="module")
def example():
    return load_example("long_range")


def _run(args, tmp_path, timeout=300) -> dict:
    return run_example("long_range", *args, "--out", str(tmp_path), timeout=timeout)


def test_trials_hold_the_cue_then_only_distractors(example):
    args = example.parse_args("--cue 3 --distance 7 --distractors 5".split())
    x, labels = jax.jit(lambda key: example.make_trials(key, 64, args))(jax.random.PRNGKey(0))
    assert x.shape == (10, 64, 6) and labels.shape == (64,)
    assert 0 < int(labels.sum()) < 64  # both classes occur
    cue, noise = np.asarray(x[..., 0]), np.asarray(x[..., 1:])
    np.testing.assert_array_equal(cue[:3], np.broadcast_to(2.0 * labels - 1.0, (3, 64)))
    assert not cue[3:].any() and not noise[:3].any()  # cue first, then distractors only
    assert noise[3:].std() > 0.5
    targets = example.last_step_targets(labels, 10)
    assert np.asarray(targets["weight"]).sum(0).tolist() == [1.0] * 64
    assert float(targets["weight"][-1].min()) == 1.0  # scored on the last step only


def test_windows_are_exact_and_truncation_gives_the_cue_weights_nothing(example):
    """The docstring's argument, checked against BPTT on a tiny instance."""
    args = example.parse_args(
        "--cue 2 --distance 9 --distractors 3 --hidden 4 --batch-size 5".split()
    )
    window, batch = 3, args.batch_size  # distance 9 = 3 windows: none holds cue and loss
    xs, targets = jax.jit(lambda key: example.make_trials_and_targets(key, args, 9))(
        jax.random.PRNGKey(1)
    )
    params = example.init_params(jax.random.PRNGKey(2), 4, 4)
    hidden = jnp.zeros((batch, 4))
    step, loss = example.leaky_step, example.cross_entropy
    reference = bptt_grad(step, loss, params, hidden, xs, targets, True)

    def grads(algorithm):
        learner = bt.compile(step, loss, algorithm, batched=True)
        state = learner.init(params, hidden, xs[0])
        run = jax.jit(lambda p, s, x, y: learner.scan(p, s, x, y, window=window))
        return run(params, state, xs, targets)[1]

    online = grads(bt.D_RTRL())
    for name in params:
        assert rel_err(online[name], reference[name]) <= 1e-10, name
    truncated = grads(bt.OneStep())
    assert float(jnp.abs(reference["w"][0]).max()) > 1e-6  # BPTT credits the cue weights
    assert float(jnp.abs(truncated["w"][0]).max()) == 0.0  # truncation cannot
    assert rel_err(truncated["readout"], reference["readout"]) <= 1e-10  # readout exact


@pytest.mark.slow
def test_quick_run_reports_the_four_rows(tmp_path):
    summary = _run(["--quick"], tmp_path)
    assert summary["example"] == "long_range"
    assert set(summary["rows"]) == ROWS
    for name, row in summary["rows"].items():
        assert ROW_KEYS <= set(row), (name, row)
        assert 0.0 <= row["test_accuracy"] <= 1.0, (name, row)
        assert row["seconds"] > 0 and row["temp_MiB"] > 0, (name, row)
    assert summary["distance"] >= 10 * summary["window"]
    # Memory against the distance: flat for the online methods (up to the per-step
    # losses the learner returns, 4 bytes a step), growing for BPTT.
    for name in ("d_rtrl", "d_rtrl_window", "tbptt"):
        near, far = summary["rows"][name]["temp_MiB_by_distance"].values()
        assert far <= 1.1 * near + 0.01, (name, near, far)
    near, far = summary["rows"]["bptt"]["temp_MiB_by_distance"].values()
    assert far > 3 * near, (near, far)
    assert pathlib.Path(summary["plot"]).is_file()


@pytest.mark.slow
def test_traces_carry_credit_that_truncation_cannot(tmp_path):
    """The example's claim at full size (15 windows between cue and answer)."""
    summary = _run(["--methods", "tbptt", "d_rtrl_window", "--iterations", "300"], tmp_path, 600)
    rows = summary["rows"]
    assert rows["d_rtrl_window"]["test_accuracy"] >= rows["tbptt"]["test_accuracy"] + 0.2, rows
    assert rows["d_rtrl_window"]["test_accuracy"] >= 0.9, rows
