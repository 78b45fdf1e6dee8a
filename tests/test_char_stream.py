"""examples/char_stream.py: its text stream (fast) and its quick run (slow)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from helpers import load_example, run_example

ROWS = {"tbptt", "d_rtrl", "d_rtrl_window", "pp_prop", "bptt_full"}


@pytest.fixture(scope="module")
def example():
    return load_example("char_stream")


def test_the_text_is_one_stream_cut_into_contiguous_pieces(example):
    codes, vocab = example.encode(example.load_text())
    assert len(codes) > 400_000 and len(vocab) == 103
    train, test = example.split(codes)
    assert len(test) == pytest.approx(0.1 * len(codes), abs=1)
    np.testing.assert_array_equal(np.concatenate([train, test]), codes)
    assert 4.6 < example.unigram_bpc(train, test, len(vocab)) < 4.9
    stream = example.pieces(train, 4)  # (L + 1, 4): piece b is train[b * L' : (b + 1) * L']
    length = len(train) // 4
    for b in range(4):
        np.testing.assert_array_equal(stream[:, b], train[b * length : b * length + len(stream)])
    args = example.parse_args(["--updates-per-call", "7", "--evals", "2"])
    assert example.plan(101, 5, args) == (4, 5)  # 20 updates of 5 steps: 4 calls of 5 (<= 7)
    args = example.parse_args(["--updates-per-call", "64", "--evals", "10"])
    assert example.plan(1281, 10, args) == (16, 8)  # 128 updates: 16 calls of 8, none left


@pytest.mark.slow
def test_quick_run_reports_every_row(tmp_path):
    summary = run_example("char_stream", "--quick", "--quiet", "--out", str(tmp_path))
    assert summary["example"] == "char_stream" and set(summary["rows"]) == ROWS
    for name, row in summary["rows"].items():
        assert {"bpc", "seconds", "temp_MiB"} <= set(row), name
        assert 0 < row["bpc"] < 8 and row["temp_MiB"] > 0, (name, row)
    steps = {name: row["steps_per_update"] for name, row in summary["rows"].items()}
    assert steps["d_rtrl"] == steps["pp_prop"] == 1 < steps["tbptt"] < steps["bptt_full"]
    assert summary["rows"]["d_rtrl"]["bpc"] < summary["unigram_bpc"]  # it learnt something
    assert pathlib.Path(summary["plot"]).is_file()
