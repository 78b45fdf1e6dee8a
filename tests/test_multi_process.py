"""Two processes under ``jax.distributed`` on the CPU train one learner data parallel.

``examples/multi_process.py --num-processes 2`` starts the second process itself; each
process passes its own half of the batch through ``braintrace.parallel``. The oracle is
one process on the whole batch: the per-step gradients and the parameters after 5 Adam
steps must agree to float32 rounding; the control (a run on process 0's half alone)
must not, or the processes did not average together.
"""

from __future__ import annotations

import pytest
from helpers import load_example, run_example


def test_the_flags():
    args = load_example("multi_process").parse_args(["--num-processes", "3", "--quiet"])
    assert args.num_processes == 3 and args.process_id is None and args.steps == 5


@pytest.mark.slow
@pytest.mark.parametrize("devices", ["1", "2"])
def test_two_processes_equal_one_process(devices):
    summary = run_example(
        "multi_process", "--num-processes", "2", "--devices-per-process", devices, timeout=600
    )
    assert summary["example"] == "multi_process" and summary["num_processes"] == 2
    assert summary["devices"] == 2 * int(devices) and summary["steps"] == 5
    assert summary["samples_held_per_device"] == [4]  # each device: its own samples only
    assert summary["max_abs_diff"] <= 1e-5, summary
    assert summary["max_abs_diff_vs_local_half"] > 1e-2, summary
