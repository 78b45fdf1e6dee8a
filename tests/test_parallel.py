"""Data parallel over devices (``braintrace.parallel``) and ensembles (``vmap`` over params).

A CPU is split into several XLA devices only before JAX starts its backend, so the
multi-device checks run in subprocesses: the example with ``--cpu-devices 2``, and this
module itself as a worker (``python tests/test_parallel.py``) under
``XLA_FLAGS=--xla_force_host_platform_device_count=2``. The worker runs the learner
with the batch split over the 2 devices, by both routes, and reports how far each
result is from the same call on one device and from BPTT (float64); the tests here
read its JSON report. The error paths and the ensembles run in-process on one device.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
import warnings

import background
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import run_example

import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax.nnx as btnnx
from braintrace import parallel
from braintrace.testing import models as M
from braintrace.testing.reference import bptt_grad
from oracles import rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
B, T = 4, 5
ALGORITHMS = {"d_rtrl": lambda: bt.D_RTRL(), "pp_prop": lambda: bt.pp_prop(0.8)}
# Operations that move data between devices other than by a sum: data parallelism must
# never need one (they would carry per-sample hidden state or traces).
MOVES = ("all-gather", "collective-permute", "all-to-all")


def _problem(model="rlif", batch=B, seed=3):
    step, params, names = {
        "rlif": (M.rlif_step, M.rlif_params(seed=1), ("i", "v")),
        "lif": (M.lif_step, M.lif_params(seed=1), ("i", "v")),
    }[model]
    hidden = M.hidden_like(names, (batch,), seed=seed)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed + 1))
    xs = jax.random.normal(k1, (T, batch, M.N_IN))
    targets = jax.random.normal(k2, (T, batch, 2))
    return step, params, hidden, xs, targets


def _largest_rel_err(got, ref) -> float:
    """Largest ``rel_err`` over the leaves of ``got``, a result like ``ref``.

    Counts (int) and leaves that are zero by structure (e.g. the trace of a state a
    parameter cannot reach) must be equal; a mismatch there counts as ``inf``.
    """
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        if jnp.issubdtype(b.dtype, jnp.integer) or not np.any(b):
            worst = max(worst, 0.0 if np.array_equal(a, b) else float("inf"))
        else:
            worst = max(worst, rel_err(a, b))
    return worst


# -- the 2-device worker ----------------------------------------------------------------------


def _collectives(compiled) -> dict:
    hlo = compiled.as_text()
    return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in MOVES + ("all-reduce",)}


def _split(tree, mesh) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return all(len({repr(s.index) for s in a.addressable_shards}) == mesh.size for a in leaves)


def _routes(mesh, name: str) -> dict:
    """``learner.scan`` by both routes against one device: errors, placement, collectives."""
    step, params, hidden, xs, targets = _problem()
    learner = bt.compile(step, M.mse, ALGORITHMS[name](), batched=True)
    state = learner.init(params, hidden, xs[0])
    reference = jax.jit(learner.scan)(params, state, xs, targets)
    args = (
        parallel.replicate(params, mesh),
        parallel.shard_state(state, mesh),
        *parallel.shard_batch((xs, targets), mesh, time_major=True),
    )
    shard_map = jax.jit(parallel.data_parallel(learner.scan, mesh)).lower(*args).compile()
    with jax.set_mesh(mesh):
        plain = jax.jit(learner.scan).lower(*args).compile()
    report = {}
    for route, compiled in (("shard_map", shard_map), ("jit", plain)):
        result = compiled(*args)
        report[route] = {
            "rel_err": _largest_rel_err(result, reference),
            "state_split": _split(result[2], mesh),
            "grads_replicated": all(
                g.sharding.is_fully_replicated for g in jax.tree_util.tree_leaves(result[1])
            ),
            "collectives": _collectives(compiled),
        }
    return report


def _step_and_window(mesh) -> dict:
    """``data_parallel`` of ``step`` (D-RTRL) and of ``scan`` in windows of 2 (pp_prop)."""
    step, params, hidden, xs, targets = _problem()
    found = {}
    for name, window in (("d_rtrl", None), ("pp_prop", 2)):
        learner = bt.compile(step, M.mse, ALGORITHMS[name](), batched=True)
        state = learner.init(params, hidden, xs[0])
        placed = (parallel.replicate(params, mesh), parallel.shard_state(state, mesh))
        if window is None:
            x, y = parallel.shard_batch((xs[0], targets[0]), mesh)
            got = jax.jit(parallel.data_parallel(learner.step, mesh))(*placed, x, y)
            ref = jax.jit(learner.step)(params, state, xs[0], targets[0])
        else:
            data = parallel.shard_batch((xs, targets), mesh, time_major=True)
            run = functools.partial(parallel.data_parallel(learner.scan, mesh), window=window)
            got = jax.jit(run)(*placed, *data)
            ref = jax.jit(functools.partial(learner.scan, window=window))(
                params, state, xs, targets
            )
        found[f"{name}_{'step' if window is None else 'window'}"] = _largest_rel_err(got, ref)
    return found


def _against_bptt(mesh) -> float:
    """Exact class (feed-forward LIF): data-parallel D-RTRL's summed gradient is BPTT's."""
    step, params, hidden, xs, targets = _problem("lif")
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    state = parallel.shard_state(learner.init(params, hidden, xs[0]), mesh)
    data = parallel.shard_batch((xs, targets), mesh, time_major=True)
    _, grads, _ = jax.jit(parallel.data_parallel(learner.scan, mesh))(params, state, *data)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, batched=True)
    return max(rel_err(grads[k], reference[k]) for k in reference)


def _ragged_batch_errors(mesh) -> dict:
    """The messages for a batch of 3 over 2 devices, from each helper."""
    step, params, hidden, xs, targets = _problem(batch=3)
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    state = learner.init(params, hidden, xs[0])
    calls = {
        "shard_state": lambda: parallel.shard_state(state, mesh),
        "shard_batch": lambda: parallel.shard_batch(xs, mesh, time_major=True),
        "data_parallel": lambda: parallel.data_parallel(learner.scan, mesh)(
            params, state, xs, targets
        ),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


class _EqxGRU(eqx.Module):
    """A per-sample Equinox model: an ETP GRU cell, read out by its first 2 units."""

    cell: bte.ETPGRUCell

    def __call__(self, x, hidden):
        hidden = self.cell(x, hidden)
        return hidden, hidden[:2]


def _faces(mesh) -> dict:
    """``data_parallel`` of an Equinox and an NNX learner's ``scan`` against one device."""
    _, _, _, xs, targets = _problem()
    hidden = jax.random.normal(jax.random.PRNGKey(5), (B, 3))
    found = {}
    for face in ("eqx", "nnx"):
        if face == "eqx":
            model = _EqxGRU(bte.ETPGRUCell(M.N_IN, 3, key=jax.random.PRNGKey(0)))
            learner, jit = bte.compile(model, M.mse, bt.D_RTRL()), eqx.filter_jit
        else:
            model = btnnx.ETPGRUCell(M.N_IN, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
            learner, jit = btnnx.compile(model, M.mse, bt.D_RTRL()), nnx.jit
            targets = jnp.concatenate([targets, targets[..., :1]], -1)  # the 3-unit carry
        state = learner.init(model, hidden, xs[0])
        reference = jit(learner.scan)(model, state, xs, targets)
        placed = parallel.shard_state(state, mesh)
        data = parallel.shard_batch((xs, targets), mesh, time_major=True)
        got = jit(parallel.data_parallel(learner.scan, mesh))(model, placed, *data)
        found[face] = {
            "rel_err": _largest_rel_err(got, reference),
            "grads_type": type(got[1]).__name__ == type(reference[1]).__name__,
            "state_split": _split(got[2], mesh),
        }
    return found


def worker(part: str) -> dict:
    """The 2-device checks of one ``part`` (``fast`` or ``slow``), as a JSON-able report."""
    jax.config.update("jax_enable_x64", True)  # as tests/conftest.py does
    warnings.simplefilter("error", bt.ETPIdentityWarning)  # as pyproject's filterwarnings
    mesh = parallel.batch_mesh()
    if part == "fast":
        return {
            "devices": mesh.size,
            "routes": {"d_rtrl": _routes(mesh, "d_rtrl")},
            "bptt_rel_err": _against_bptt(mesh),
            "ragged": _ragged_batch_errors(mesh),
            "faces": _faces(mesh),
        }
    return {
        "devices": mesh.size,
        "routes": {"pp_prop": _routes(mesh, "pp_prop")},
        "step_and_window": _step_and_window(mesh),
    }


def _worker_env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


# The 2-device subprocesses start at collection and run once per test run (background.py).
for _part, _fixture in (("fast", "two_devices"), ("slow", "two_devices_slow")):
    background.register(
        f"parallel_{_part}",
        background.Job(
            _fixture, [sys.executable, __file__, _part], env=_worker_env(), cwd=str(ROOT)
        ),
    )


def _report(stdout: str) -> dict:
    report = background.last_json(stdout)
    assert report["devices"] == 2
    return report


@pytest.fixture(scope="session")
def two_devices(job_stdout) -> dict:
    return _report(job_stdout("parallel_fast"))


@pytest.fixture(scope="session")
def two_devices_slow(job_stdout) -> dict:
    return _report(job_stdout("parallel_slow"))


# -- on 2 devices ----------------------------------------------------------------------------

# D-RTRL runs in the default suite, pp_prop with the slow tests (one more subprocess).
ALGOS = [pytest.param("d_rtrl"), pytest.param("pp_prop", marks=pytest.mark.slow)]


def _routes_of(request, algo: str) -> dict:
    report = request.getfixturevalue("two_devices" if algo == "d_rtrl" else "two_devices_slow")
    return report["routes"][algo]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("route", ["shard_map", "jit"])
def test_a_sharded_scan_equals_one_device(request, algo, route):
    found = _routes_of(request, algo)[route]
    assert found["rel_err"] <= 1e-12, found
    assert found["state_split"], "hidden state, traces or count not split over the devices"
    assert found["grads_replicated"]
    assert found["collectives"]["all-reduce"] >= 1  # the gradient's cross-device mean


@pytest.mark.parametrize("algo", ALGOS)
def test_data_parallel_moves_no_per_sample_state(request, algo):
    collectives = _routes_of(request, algo)["shard_map"]["collectives"]
    assert all(collectives[op] == 0 for op in MOVES), collectives


@pytest.mark.parametrize("algo", ALGOS)
def test_plain_jit_moves_no_per_sample_state(request, algo):
    collectives = _routes_of(request, algo)["jit"]["collectives"]
    assert all(collectives[op] == 0 for op in MOVES), collectives


@pytest.mark.slow
def test_data_parallel_step_and_windows_equal_one_device(two_devices_slow):
    found = two_devices_slow["step_and_window"]
    assert set(found) == {"d_rtrl_step", "pp_prop_window"}
    assert max(found.values()) <= 1e-12, found


def test_data_parallel_d_rtrl_is_bptt_in_the_exact_class(two_devices):
    assert two_devices["bptt_rel_err"] <= 1e-10


@pytest.mark.parametrize("face", ["eqx", "nnx"])
def test_face_learners_run_data_parallel(two_devices, face):
    """``data_parallel(learner.scan, mesh)`` for the Equinox and NNX faces: model-shaped
    gradients (an ``nnx.State`` for NNX) equal to one device's, per-sample state split."""
    found = two_devices["faces"][face]
    assert found["rel_err"] <= 1e-12 and found["grads_type"] and found["state_split"], found


def test_a_batch_that_does_not_split_over_the_devices_is_refused(two_devices):
    for where, message in two_devices["ragged"].items():
        assert message is not None, f"{where} accepted a batch of 3 over 2 devices"
        assert "3 samples" in message and "multiple of 2" in message, message


@pytest.mark.slow  # the sharded-scan tests above check the same route in the default run
def test_the_example_on_two_cpu_devices():
    summary = run_example("data_parallel", "--cpu-devices", "2", timeout=600)
    assert summary["example"] == "data_parallel" and summary["devices"] == 2
    assert summary["platform"] == "cpu"
    assert 0.0 < summary["max_abs_diff"] <= 1e-5, summary  # rounding only (float32)
    assert all(summary["state_split_over_devices"].values()), summary
    assert all(summary["collectives"]["shard_map"][op] == 0 for op in MOVES), summary
    assert summary["loss_last_steps"] < summary["loss_first_steps"], summary


# -- on one device: errors --------------------------------------------------------------------


def test_an_unbatched_learner_is_refused():
    step, params, hidden, xs, targets = _problem()
    one = jax.tree_util.tree_map(lambda a: a[0], hidden)
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=False)
    state = learner.init(params, one, xs[0, 0])
    mesh = parallel.batch_mesh()
    with pytest.raises(ValueError, match=r"unbatched learner.*batched=True"):
        parallel.shard_state(state, mesh)
    with pytest.raises(ValueError, match=r"not batched.*batched=True"):
        parallel.data_parallel(learner.step, mesh)
    with pytest.raises(TypeError, match="LearnerState"):
        parallel.shard_state(state.hidden, mesh)
    with pytest.raises(TypeError, match="bound step, window or scan"):
        parallel.data_parallel(step, mesh)


def test_face_learners_are_checked_like_core_learners():
    mesh = parallel.batch_mesh()
    model = _EqxGRU(bte.ETPGRUCell(M.N_IN, 3, key=jax.random.PRNGKey(0)))
    one = bte.compile(model, M.mse, bt.D_RTRL(), batched=False)
    with pytest.raises(ValueError, match=r"not batched.*batched=True"):
        parallel.data_parallel(one.scan, mesh)
    rnn = btnnx.compile(nnx.RNN(btnnx.ETPGRUCell(M.N_IN, 3, rngs=nnx.Rngs(0))), M.mse, bt.D_RTRL())
    with pytest.raises(TypeError, match=r"learner\.inner"):
        parallel.data_parallel(rnn.scan, mesh)
    replicated = parallel.replicate(model, mesh)  # array leaves placed, static ones kept
    assert replicated.cell.weight_hh.sharding.is_fully_replicated
    assert replicated.cell.hidden_size == 3


def test_leaves_without_a_batch_axis_and_unknown_mesh_axes_are_refused():
    mesh = parallel.batch_mesh()
    with pytest.raises(ValueError, match=r"input\['x'\] has shape \(\), with no batch axis"):
        parallel.shard_batch({"x": jnp.float32(1.0)}, mesh)
    with pytest.raises(ValueError, match="no batch axis at dimension 1"):
        parallel.shard_batch(jnp.ones(5), mesh, time_major=True)
    with pytest.raises(ValueError, match="no axis 'data'"):
        parallel.shard_batch(jnp.ones((4, 3)), mesh, axis="data")


def test_data_parallel_on_one_device_is_the_learner():
    step, params, hidden, xs, targets = _problem()
    learner = bt.compile(step, M.mse, bt.pp_prop(0.8), batched=True)
    state = learner.init(params, hidden, xs[0])
    mesh = parallel.batch_mesh(jax.devices()[:1])
    got = jax.jit(parallel.data_parallel(learner.step, mesh))(params, state, xs[0], targets[0])
    ref = jax.jit(learner.step)(params, state, xs[0], targets[0])
    assert _largest_rel_err(got, ref) <= 1e-12


# -- ensembles: vmap over stacked parameters ----------------------------------------------------


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_vmap_of_step_over_a_population_equals_each_member_alone(algo):
    step, _, hidden, xs, targets = _problem()
    members = [M.rlif_params(seed=s) for s in (1, 2, 3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *members)
    learner = bt.compile(step, M.mse, ALGORITHMS[algo](), batched=True)
    states = jax.vmap(learner.init, in_axes=(0, None, None))(stacked, hidden, xs[0])
    population = jax.jit(jax.vmap(learner.step, in_axes=(0, 0, None, None)))
    alone = jax.jit(learner.step)
    solo = [learner.init(p, hidden, xs[0]) for p in members]
    for t in range(3):  # the traces carry over, so step 3 checks their propagation
        together = population(stacked, states, xs[t], targets[t])
        states = together[2]
        for m, params in enumerate(members):
            result = alone(params, solo[m], xs[t], targets[t])
            solo[m] = result[2]
            mine = jax.tree_util.tree_map(lambda a, m=m: a[m], together)
            assert _largest_rel_err(mine, result) <= 1e-12, (t, m)
    # Negative control: the members really differ (a broadcast of one would fail above).
    grads = together[1]
    assert rel_err(grads["wr"][0], grads["wr"][1]) > 1e-3


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
