"""Smoke tests for the Equinox examples: each runs end to end with ``--quick``.

The example runs in a subprocess (its own JAX config: float32, as a user runs it; this
suite's conftest turns x64 on in-process).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "eqx_lif_snn.py"
REQUIRED = {"example", "algorithm", "test_accuracy", "seconds", "chance"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_eqx_lif_snn_quick_run(tmp_path):
    result = _run("--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
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


def test_eqx_lif_snn_help():
    result = _run("--help")
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--algorithm", "--compare", "--quick", "--out", "--seed"):
        assert flag in result.stdout
