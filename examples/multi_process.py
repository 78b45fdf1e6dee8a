"""Online training data parallel over several processes, checked against one process.

Several processes on this machine (standing in for several hosts) run the same code
under ``jax.distributed.initialize(coordinator_address="127.0.0.1:PORT",
num_processes=N, process_id=i)`` on the CPU backend, with one mesh over the devices
of all of them. Each process passes only its own block of the batch (process-local
data) through :mod:`braintrace.parallel`: ``shard_state`` and ``shard_batch``
assemble the global arrays, ``replicate`` the parameters and the optimiser state,
and ``data_parallel(learner.step, mesh)`` averages the gradient over the processes.
A GRU (``braintrace.testing.models.gru_step``) learns online with an Adam update at
every time step.

The coordinating process (process 0, the one you start) launches the others, and
after the run repeats it in one process on the whole batch; its JSON summary (the
last stdout line) holds the largest difference between the two runs' per-step
gradients and final parameters (``max_abs_diff``; float32: summation order only),
and, as a control, the difference to a run on process 0's half of the batch alone
(``max_abs_diff_vs_local_half``, large: the processes really averaged together).

Run
---
``python examples/multi_process.py --num-processes 2``
``python examples/multi_process.py --num-processes 2 --devices-per-process 2``

On real hosts, start the same script on each with ``--process-id i`` and the first
host's address in ``--coordinator HOST:PORT`` (and drop the CPU settings).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common as common
import braintrace as bt
from braintrace import parallel
from braintrace.testing import models

ALGORITHMS = {"d_rtrl": lambda: bt.D_RTRL(), "pp_prop": lambda: bt.pp_prop(0.9)}
N_IN = 3


def parse_args(argv=None) -> argparse.Namespace:
    p = common.argument_parser(__doc__)
    p.add_argument("--num-processes", type=int, default=2, help="processes to run")
    p.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process's index (set by the coordinator for the processes it starts)",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        help="HOST:PORT of process 0 (default: 127.0.0.1 and a free port)",
    )
    p.add_argument(
        "--devices-per-process", type=int, default=1, help="CPU devices each process holds"
    )
    p.add_argument(
        "--algorithm", choices=sorted(ALGORITHMS), default="d_rtrl", help="online algorithm"
    )
    p.add_argument("--batch-per-device", type=int, default=4, help="samples on each device")
    p.add_argument("--hidden", type=int, default=16, help="GRU units")
    p.add_argument("--steps", type=int, default=5, help="time steps, one Adam update each")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    p.add_argument(
        "--timeout", type=int, default=300, help="seconds to wait for the other processes"
    )
    common.add_run_flags(
        p,
        quick_help="the same run (it is already seconds long)",
        verbose_help="print each process's devices",
        plot=False,
    )
    args = p.parse_args(argv)
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num-processes and --devices-per-process must be at least 1")
    return args


def free_port() -> int:
    """A TCP port that was free a moment ago (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_others(args, coordinator: str) -> list:
    """Start processes ``1 .. N-1`` running this script (their output is collected)."""
    argv = [a for a in sys.argv[1:] if a not in ("--quiet",)]
    return [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--process-id", str(i)]
            + ["--coordinator", coordinator, "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(1, args.num_processes)
    ]


def initialize(args, coordinator: str, process_id: int) -> None:
    """CPU devices for this process, then join the others (must precede any JAX work)."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=args.num_processes,
        process_id=process_id,
        initialization_timeout=args.timeout,
    )


def task(args, batch: int):
    """The whole batch's data, the same in every process: time-major ``(T, B, ...)``.

    Targets are the inputs of one and two steps back (a memory task).
    """
    rng = np.random.default_rng(args.seed)
    xs = rng.normal(size=(args.steps, batch, N_IN)).astype(np.float32)
    past = np.concatenate([np.zeros((2, batch, N_IN), np.float32), xs])
    ys = np.stack([past[1:-1, :, 0], past[:-2, :, 1]], axis=-1)
    params = models.gru_params(args.seed, n_in=N_IN, n=args.hidden, dtype=jnp.float32)
    return params, np.zeros((batch, args.hidden), np.float32), xs, ys


def online(step, optimizer, params, state, xs, ys, place=lambda a: a):
    """``len(xs)`` online steps, an Adam update after each: ``(grads per step, params)``."""

    @jax.jit
    def update(params, opt_state, state, x, y):
        (loss, _), grads, state = step(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, grads

    opt_state, per_step = optimizer.init(params), []
    for x, y in zip(xs, ys):
        params, opt_state, state, grads = update(params, opt_state, state, *place((x, y)))
        per_step.append(grads)
    return per_step, params, state


def local_value(tree):
    """A replicated global array's value, as NumPy (each process holds a whole copy)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_shards[0].data), tree)


def max_abs_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda u, v: float(np.max(np.abs(u - v))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def run_distributed(args, learner, optimizer, data) -> dict:
    """Every process: its block of the batch through ``braintrace.parallel``."""
    params, hidden, xs, ys = data
    mesh = parallel.batch_mesh()  # every device of every process
    me, n = jax.process_index(), jax.process_count()
    block = slice(me * len(hidden) // n, (me + 1) * len(hidden) // n)  # this process's samples
    state = learner.init(params, hidden[block], xs[0, block])
    per_step, new_params, state = online(
        parallel.data_parallel(learner.step, mesh),
        optimizer,
        parallel.replicate(params, mesh),
        parallel.shard_state(state, mesh),
        xs[:, block],
        ys[:, block],
        place=lambda a: parallel.shard_batch(a, mesh),
    )
    held = {s.data.shape[0] for s in state.count.addressable_shards}
    return {
        "grads": local_value(per_step),
        "params": local_value(new_params),
        "samples_held_per_device": sorted(held),
        "devices": mesh.size,
    }


def run_alone(learner, optimizer, data, samples=None) -> dict:
    """One process, one device, ``samples`` of the batch (default: all of it)."""
    params, hidden, xs, ys = data
    block = slice(None) if samples is None else samples
    device = jax.local_devices()[0]
    put = lambda a: jax.device_put(a, device)  # noqa: E731
    state = learner.init(params, put(hidden[block]), put(xs[0, block]))
    per_step, new_params, _ = online(
        learner.step, optimizer, put(params), state, put(xs[:, block]), put(ys[:, block])
    )
    return {"grads": jax.device_get(per_step), "params": jax.device_get(new_params)}


def wait_for(others, timeout: int) -> None:
    """Wait for the processes this one started; fail with their stderr if one failed."""
    for i, proc in enumerate(others, start=1):
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise SystemExit(f"process {i} failed (exit {proc.returncode}):\n{err[-3000:]}")


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    start = time.perf_counter()
    me = 0 if args.process_id is None else args.process_id
    coordinator = args.coordinator or f"127.0.0.1:{free_port()}"
    others = launch_others(args, coordinator) if args.process_id is None else []
    try:
        return run(args, coordinator, me, others, start)
    except BaseException:
        for proc in others:  # never leave the processes this one started behind
            proc.kill()
        raise


def run(args, coordinator: str, me: int, others: list, start: float) -> dict | None:
    """Process ``me``'s part: the distributed run; process 0 also checks it and reports."""
    initialize(args, coordinator, me)
    if args.verbose:
        print(f"process {me}: local devices {jax.local_devices()}", flush=True)
    batch = args.batch_per_device * args.devices_per_process * args.num_processes
    learner = bt.compile(models.gru_step, models.mse, ALGORITHMS[args.algorithm](), batched=True)
    optimizer, data = optax.adam(args.lr), task(args, batch)
    spread = run_distributed(args, learner, optimizer, data)
    if me != 0:
        jax.distributed.shutdown()
        return None
    whole = run_alone(learner, optimizer, data)
    half = run_alone(learner, optimizer, data, slice(0, batch // args.num_processes))
    jax.distributed.shutdown()  # a barrier: the other processes wait in theirs until now
    wait_for(others, args.timeout)
    diff_grads = max_abs_diff(spread["grads"], whole["grads"])
    diff_params = max_abs_diff(spread["params"], whole["params"])
    return common.print_summary(
        {
            "example": "multi_process",
            "num_processes": args.num_processes,
            "max_abs_diff": max(diff_grads, diff_params),
            "max_abs_diff_grads": diff_grads,
            "max_abs_diff_params": diff_params,
            "max_abs_diff_vs_local_half": max_abs_diff(spread["grads"], half["grads"]),
            "devices": spread["devices"],
            "samples_held_per_device": spread["samples_held_per_device"],
            "algorithm": args.algorithm,
            "batch": batch,
            "steps": args.steps,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )


if __name__ == "__main__":
    main()
