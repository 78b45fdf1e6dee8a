"""Resume an online run mid-stream from an Orbax checkpoint: it ends bit-identical.

``examples/resume_stream.py`` trains online on a long stream, checkpoints everything
(parameters, optimiser state, the learner's whole state with traces and counts, the
stream's key) after step ``k`` and resumes it. The oracle is the uninterrupted run;
the control resumes with the traces zeroed, which must differ. The fast test resumes
in this process (a fresh learner and model); the slow one in a new process, for
every face and algorithm (D-RTRL, pp_prop, D-RTRL windows).
"""

from __future__ import annotations

import jax
import pytest
from helpers import load_example, run_example


@pytest.mark.parametrize(
    "face, algorithm",
    [("linen", "pp_prop"), pytest.param("nnx", "window", marks=pytest.mark.slow)],
)
def test_a_restored_run_ends_bit_identical(tmp_path, face, algorithm):
    ex = load_example("resume_stream")
    update, run = ex.fresh_run(face, algorithm, seed=0)
    run = ex.advance(update, run, 8)
    ex.save(tmp_path / "k", ex.arrays_of(face, run))
    final = ex.arrays_of(face, ex.advance(update, run, 16))

    _, template = ex.fresh_run(face, algorithm, seed=0)  # a new learner and model, the same jit
    saved = ex.restore(tmp_path / "k", ex.arrays_of(face, template))
    assert int(saved["step"]) == 8 and saved["key"].dtype == jax.numpy.uint32
    resumed = ex.with_arrays(face, template, saved)
    control = dict(
        resumed, state=resumed["state"]._replace(traces=ex._zeros(resumed["state"].traces))
    )
    if face == "nnx":
        control["trained"], control["opt"] = (
            ex.nnx.clone(resumed["trained"]),
            ex.nnx.clone(resumed["opt"]),
        )
    same, diff = ex.compare(ex.arrays_of(face, ex.advance(update, resumed, 16)), final)
    assert same and diff == 0.0
    same, diff = ex.compare(ex.arrays_of(face, ex.advance(update, control, 16)), final)
    assert not same and diff > 1e-4  # the traces carry what the run learns from


@pytest.mark.slow
def test_every_face_and_algorithm_resumes_bit_identical_in_a_new_process():
    summary = run_example("resume_stream", "--quick", timeout=900)
    assert summary["example"] == "resume_stream" and summary["bit_identical"] is True
    assert len(summary["cases"]) == 12  # 4 faces x (D-RTRL, pp_prop, windows)
    for case, result in summary["cases"].items():
        assert result["bit_identical"] and result["max_abs_diff"] == 0.0, case
        assert result["max_abs_diff_without_traces"] > 1e-4, case
