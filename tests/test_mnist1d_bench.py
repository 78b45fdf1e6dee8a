"""benchmarks/mnist1d.py: its rows, loss weights and LRU model (fast), and its runs (slow).

The ``--quick`` run starts a fresh interpreter (float32, as a user would); it compiles
every row, so it is behind the ``slow`` marker with the check of the generated data.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import braintrace as bt

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "mnist1d.py"
ISSUE_ROWS = ("bptt", "d_rtrl", "d_rtrl_window10", "pp_prop", "tbptt10", "one_step")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mnist1d", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (flax modules) look their module up
    spec.loader.exec_module(module)
    return module


def test_rows_follow_the_algorithms_the_library_has(bench, monkeypatch):
    rows = bench.available_rows()
    assert set(ISSUE_ROWS) <= set(rows)
    assert {"lru_bptt", "lru_d_rtrl"} <= set(rows)
    for name in ("rtrl", "snap1", "uoro"):  # present exactly when the library has them
        assert (name in rows) == (name in bt.ALGORITHM_NAMES), name
    monkeypatch.setattr(bt, "ALGORITHM_NAMES", ("d_rtrl", "pp_prop", "bptt", "one_step"))
    assert not {"rtrl", "snap1", "uoro"} & set(bench.available_rows())
    with pytest.raises(ValueError, match="unknown rows"):
        bench.available_rows(["nope"])


def test_loss_weights(bench):
    ramp = bench.step_weights("ramp")
    assert ramp.shape == (40,) and abs(float(ramp.sum()) - 1.0) < 1e-6
    assert np.all(np.diff(ramp) > 0) and ramp[-1] == pytest.approx(40 * ramp[0])
    assert bench.step_weights("last").tolist() == [0.0] * 39 + [1.0]
    xs, targets = bench.time_major(np.ones((3, 40), np.float32), np.array([1, 2, 3]), ramp)
    assert xs.shape == (40, 3, 1) and targets["label"][5].tolist() == [1, 2, 3]
    loss = bench.cross_entropy(jnp.zeros(10), {"label": 4, "weight": 0.5})
    assert float(loss) == pytest.approx(0.5 * np.log(10.0))


def test_the_lru_model_is_exact_on_top_and_as_big_as_the_gru(bench):
    x0 = jnp.zeros((2, 1), jnp.float32)  # the models keep float32 states
    sizes = {}
    for row in ("lru_d_rtrl", "d_rtrl"):  # the full run's sizes, from shapes only
        model = bench.build_model(bench.ROWS[row], bench.parse_args([]))
        shapes = jax.eval_shape(model.init, jax.random.key(0), model.zero_carry(2), x0)
        sizes[row] = sum(p.size for p in jax.tree_util.tree_leaves(shapes["params"]))
    assert 0.7 < sizes["lru_d_rtrl"] / sizes["d_rtrl"] < 1.3, sizes  # comparable counts
    lru_model = bench.build_model(bench.ROWS["lru_d_rtrl"], bench.parse_args(["--quick"]))
    params = lru_model.init(jax.random.key(0), lru_model.zero_carry(2), x0)["params"]
    learner = bench.btf.compile(lru_model, bench.cross_entropy, bt.D_RTRL())
    report = learner.report(params, lru_model.zero_carry(2), x0)
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        path = jax.tree_util.keystr(path)
        want = "approximate" if path.startswith("['lru_low']") else "exact"
        assert report.param(path).gradient == want, (path, report.param(path))


@pytest.mark.slow
def test_data_and_quick_run(bench, tmp_path):
    x, y, x_test, y_test = bench.load_mnist1d()
    assert x.shape == (4000, 40) and x_test.shape == (1000, 40)
    assert sorted(set(y.tolist())) == list(range(10)) and y_test.shape == (1000,)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--quiet", "--out", str(tmp_path)],
        cwd=BENCH.parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "mnist1d"
    assert set(summary["rows"]) == set(bench.available_rows())
    for name, row in summary["rows"].items():
        assert {"test_accuracy", "std", "seconds", "trace_KiB", "temp_MiB"} <= set(row), name
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["temp_MiB"] > 0, (name, row)
        assert len(row["accuracies"]) == len(summary["seeds"]) == 2
    assert summary["rows"]["d_rtrl"]["trace_KiB"] > 0 == summary["rows"]["bptt"]["trace_KiB"]
    assert summary["published"]["gru"] == 0.91
    assert pathlib.Path(summary["plot"]).is_file()
