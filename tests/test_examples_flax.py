"""The Flax examples run end to end (``--quick``: a few batches) and report JSON.

Each example runs in a fresh interpreter, as a user would start it: float32
defaults (this suite's x64 setting does not leak in), cwd at the repository root.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRED = {"example", "algorithm", "test_accuracy", "seconds", "chance"}

CASES = {
    # --compare also trains BPTT, so both learner paths (online scan, BPTT scan) run.
    "flax_gru_digits": ["--quick", "--compare"],
    "flax_lora_adapt": ["--quick"],
}


@pytest.mark.parametrize("example", sorted(CASES))
def test_example_quick_run_reports_json(example, tmp_path):
    script = ROOT / "examples" / f"{example}.py"
    result = subprocess.run(
        [sys.executable, str(script), *CASES[example], "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    summary = json.loads(lines[-1])  # the contract: the LAST stdout line is JSON
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
