"""The Flax examples: their flags and shared helpers (fast), and end-to-end runs (slow).

The ``--quick`` runs start a fresh interpreter, as a user would: float32 defaults
(this suite's x64 setting does not leak in), cwd at the repository root. They train
for seconds each, so they are behind the ``slow`` marker; the Equinox example's quick
run (tests/test_examples_eqx.py) is the one that stays in the default run.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import load_example, run_example

REQUIRED = {"example", "algorithm", "test_accuracy", "seconds", "chance"}

CASES = {
    # --compare also trains BPTT, so both learner paths (online scan, BPTT scan) run.
    "flax_gru_digits": ["--quick", "--compare"],
    "flax_lora_adapt": ["--quick"],
}


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_flags(example):
    args = load_example(example).parse_args(["--quick", "--algorithm", "pp_prop", "--seed", "3"])
    assert args.quick and args.algorithm == "pp_prop" and args.seed == 3
    assert args.max_batches == 3 and args.hidden == 16  # --quick shrinks the run
    full = load_example(example).parse_args([])
    assert full.max_batches == 0 and full.hidden > 16 and full.algorithm == "d_rtrl"


def test_shared_helpers():
    common = load_example("_common")
    rng = np.random.default_rng(0)
    batches = list(common.minibatches(10, 3, rng))
    assert [len(b) for b in batches] == [3, 3, 3]  # full batches only
    assert len(np.unique(np.concatenate(batches))) == 9  # no index twice in an epoch
    assert len(list(common.minibatches(10, 3, rng, max_batches=2))) == 2
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)  # (B, T, C)
    xs, targets = common.last_step_targets(x, np.array([7, 1]))
    np.testing.assert_array_equal(np.asarray(xs[2]), x[:, 2])  # time-major
    np.testing.assert_array_equal(np.asarray(targets["weight"]), [[0, 0], [0, 0], [0, 0], [1, 1]])
    logits = np.zeros(10, np.float32)
    loss = common.last_step_cross_entropy(logits, {"label": 3, "weight": 1.0})
    np.testing.assert_allclose(float(loss), np.log(10.0), rtol=1e-6)  # uniform over 10
    assert float(common.last_step_cross_entropy(logits, {"label": 3, "weight": 0.0})) == 0.0
    # plot_training is exercised by the Equinox example's quick run.


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(CASES))
def test_example_quick_run_reports_json(example, tmp_path):
    summary = run_example(example, *CASES[example], "--out", str(tmp_path))
    assert REQUIRED <= set(summary), sorted(REQUIRED - set(summary))
    assert summary["example"] == example
    assert summary["algorithm"] == "d_rtrl"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["seconds"] > 0
    assert list(tmp_path.glob(f"{example}_*.png")), "no plot written"
    if example == "flax_gru_digits":
        assert 0.0 <= summary["bptt_test_accuracy"] <= 1.0
    if example == "flax_lora_adapt":
        assert summary["base_max_abs_diff"] == 0.0  # the frozen base never moves
