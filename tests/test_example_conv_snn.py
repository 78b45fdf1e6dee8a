"""The convolutional spiking digits example: its data, its claims, and its runs.

The in-process checks run in float64 (this suite's conftest) on tiny shapes against an
independent oracle, BPTT written here as ``jax.grad`` through a ``lax.scan`` of the
plain model: the conv LIF layer on its own is in the exact class (D-RTRL's conv
gradient is BPTT's), in the two-layer network the dense layer and the readout stay
exact while the conv layer, the lower layer of a stack, is approximate (as the compile
report says). The ``--quick`` run starts a fresh interpreter, as a user would
(float32); it takes tens of seconds, so it is behind the ``slow`` marker.
"""

from __future__ import annotations

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_example, run_example

from oracles import rel_err

ROWS = {"d_rtrl", "pp_prop", "bptt", "one_step"}
ROW_KEYS = {"test_accuracy", "seconds", "trace_MiB"}
STEPS, BATCH = 6, 3


@pytest.fixture(scope="module")
def example():
    return load_example("conv_snn_digits")


@pytest.fixture(scope="module")
def tiny(example):
    """A tiny float64 network (2 filters, 4 dense neurons) and three 6-step movies; the
    larger kernel gain makes both layers spike within the six steps."""
    args = example.parse_args("--channels 2 --hidden 4 --conv-gain 12".split())
    x_train, _, y_train, _ = example.load_spike_frames(STEPS, 0.5)
    x = jnp.asarray(x_train[:, :BATCH], jnp.float64)
    model = example.init_model(jax.random.PRNGKey(3), args)
    assert model.conv.weight.dtype == jnp.float64
    return args, model, x, jnp.asarray(y_train[:BATCH])


def bptt_oracle(example, model, args, x, labels):
    """``d/dmodel sum_t mean_b ce(model's logits at t, label)`` by ``jax.grad``."""

    def loss(model):
        def body(hidden, x_t):
            hidden, logits = jax.vmap(model)(x_t, hidden)
            return hidden, jax.vmap(example.cross_entropy)(logits, labels).mean()

        hidden = example.zero_state(x.shape[1], args.channels, args.hidden)
        return jax.lax.scan(body, hidden, x)[1].sum()

    return eqx.filter_grad(loss)(model)


def online_grads(example, model, args, x, labels, row: str):
    learner = example.make_learner(model, row, args)
    state = learner.init(model, example.zero_state(x.shape[1], args.channels, args.hidden), x[0])
    targets = example.every_step_targets(labels, x.shape[0])
    return learner.scan(model, state, x, targets)[1]


def test_spike_frames_rate_code_the_digits(example):
    x_train, x_test, y_train, y_test = example.load_spike_frames(4, 0.5)
    assert x_train.shape == (4, len(y_train), 1, 8, 8) and x_test.shape[1] == len(y_test)
    assert len(y_train) + len(y_test) == 1797 and set(np.unique(y_test)) == set(range(10))
    assert set(np.unique(x_train)) == {0.0, 1.0}  # binary spike frames
    # A full pixel fires at --max-rate, an empty one never: the mean rate is the mean
    # intensity times the rate (the digits' mean intensity is about 0.3).
    again = example.load_spike_frames(4, 0.5)[0]
    np.testing.assert_array_equal(x_train, again)  # the same frames for every row
    assert 0.1 < x_train.mean() < 0.2
    with pytest.raises(ValueError, match="conv_snn_digits: --steps"):
        example.load_spike_frames(0, 0.5)


@pytest.mark.slow
def test_conv_lif_layer_alone_is_exact(example, tiny):
    """The conv op drives the membranes directly: D-RTRL gives BPTT's conv gradient."""
    args, model, x, labels = tiny

    class ConvOnly(type(model)):
        """The conv LIF layer read out directly (the dense state passes through)."""

        def __call__(self, x, hidden):
            conv_state = self.conv_layer(x, hidden[0])
            logits = self.readout(jnp.ravel(self.conv_spikes(conv_state)))
            return (conv_state, hidden[1]), logits

    readout = eqx.nn.Linear(args.channels * 64, 10, key=jax.random.PRNGKey(4))
    conv_only = ConvOnly(model.conv, model.dense, readout)
    reference = bptt_oracle(example, conv_only, args, x, labels)
    got = online_grads(example, conv_only, args, x, labels, "d_rtrl")
    truncated = online_grads(example, conv_only, args, x, labels, "one_step")
    for get in (lambda m: m.conv.weight, lambda m: m.conv.bias, lambda m: m.readout.weight):
        assert rel_err(get(got), get(reference)) <= 1e-10
    assert rel_err(truncated.conv.weight, reference.conv.weight) > 1e-3  # negative control


@pytest.mark.slow
def test_two_layer_network_dense_exact_conv_approximate(example, tiny):
    args, model, x, labels = tiny
    reference = bptt_oracle(example, model, args, x, labels)
    got = online_grads(example, model, args, x, labels, "d_rtrl")
    exact = ("dense_weight", "dense_bias", "dense_decay")
    for name in exact:
        get = example.TRACED_LEAVES[name]
        assert rel_err(get(got), get(reference)) <= 1e-10, name
    assert rel_err(got.readout.weight, reference.readout.weight) <= 1e-10
    # The conv layer feeds the dense layer's memory, a path D-RTRL cuts.
    assert rel_err(got.conv.weight, reference.conv.weight) > 1e-3


def test_flags(example):
    args = example.parse_args(["--quick", "--rows", "d_rtrl", "bptt"])
    assert args.rows == ["d_rtrl", "bptt"] and args.epochs == 2 and args.steps == 6
    full = example.parse_args([])
    assert set(full.rows) == ROWS and full.steps == 20 and full.epochs > 2


@pytest.mark.slow
def test_quick_run_reports_the_four_rows(tmp_path):
    summary = run_example("conv_snn_digits", "--quick", "--quiet", "--out", str(tmp_path))
    assert summary["example"] == "conv_snn_digits" and set(summary["rows"]) == ROWS
    for name, row in summary["rows"].items():
        assert ROW_KEYS <= set(row), (name, row)
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["seconds"] > 0, (name, row)
    rows = summary["rows"]
    assert rows["d_rtrl"]["trace_MiB"] > rows["pp_prop"]["trace_MiB"] > 0
    assert rows["bptt"]["trace_MiB"] == rows["one_step"]["trace_MiB"] == 0
    # The dense layer is in the exact class: D-RTRL's gradient is BPTT's (float32).
    cosines = summary["grad_cosine_vs_bptt_at_init"]
    assert set(cosines) == {"d_rtrl", "pp_prop", "one_step"}
    assert min(cosines["d_rtrl"][k] for k in ("dense_weight", "dense_bias")) > 0.999
    assert cosines["one_step"]["dense_weight"] < 0.99  # what the traces add
    assert pathlib.Path(summary["plot"]).is_file()
    assert pathlib.Path(summary["plot"]).name == "conv_snn_digits_quick.png"
