"""The Equinox example runs end to end with ``--quick`` (the example run kept in CI).

The example runs in a subprocess (its own JAX config: float32, as a user runs it; this
suite's conftest turns x64 on in-process).
"""

from __future__ import annotations

import pathlib

from helpers import load_example, run_example

REQUIRED = {"example", "algorithm", "test_accuracy", "seconds", "chance"}


def test_eqx_lif_snn_quick_run(tmp_path):
    summary = run_example("eqx_lif_snn", "--quick", "--out", str(tmp_path))
    assert REQUIRED <= set(summary), summary
    assert summary["example"] == "eqx_lif_snn" and summary["algorithm"] == "d_rtrl"
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["chance"] == 0.5
    assert pathlib.Path(summary["plot"]).is_file()
    # The network is in braintrace's exact class: D-RTRL's trial gradient is BPTT's
    # (up to float32 rounding) for every trace-trained leaf.
    cosines = summary["grad_cosine_vs_bptt_at_init"]
    assert set(cosines) == {"input_weight", "input_bias", "decay"}
    assert min(cosines.values()) > 0.999, cosines


def test_eqx_lif_snn_flags():
    example = load_example("eqx_lif_snn")
    args = example.parse_args(["--quick", "--algorithm", "pp_prop", "--compare"])
    assert args.algorithm == "pp_prop" and args.compare
    assert args.iterations == 20 and args.hidden == 16  # --quick shrinks the run
    full = example.parse_args([])
    assert full.iterations > 20 and full.algorithm == "d_rtrl"
    assert set(example.ALGORITHMS) >= {"d_rtrl", "pp_prop", "bptt", "one_step"}
