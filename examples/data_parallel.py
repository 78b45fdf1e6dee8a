"""Online training data parallel over every visible device, checked against one device.

A GRU (``braintrace.testing.models.gru_step``) learns online, with an Adam update at
every time step, to report its inputs of one and two steps back (a memory task). The
batch is split over all visible devices: each device keeps the hidden state and the
eligibility traces of its own samples, the parameters and the optimiser state are
replicated, and the gradient (the batch mean) is the only thing summed across
devices. The same training then runs on one device, and the script prints the largest
difference between the two runs' gradients and parameters (float32: it is rounding,
from summing the batch in another order).

Two routes of ``braintrace.parallel`` are run and checked:

- ``shard_map``: ``parallel.data_parallel(learner.step, mesh)``, each device runs the
  learner on its slice of the batch and the gradient is averaged with one all-reduce;
- ``jit``: plain ``jax.jit`` of ``learner.step`` on arguments placed with
  ``parallel.replicate`` / ``shard_state`` / ``shard_batch``, inside
  ``jax.set_mesh(mesh)``; XLA's partitioner inserts the reduction.

For each route the summary also counts the collectives in the compiled training
program: an all-gather or a collective-permute there moves per-sample state (hidden
state or traces) between devices, which data parallelism should never need.

Devices
-------
On GPUs or TPUs every visible accelerator is used. A CPU is one device unless XLA is
told to split it, before JAX starts its backend::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/data_parallel.py

or ``python examples/data_parallel.py --cpu-devices 2``, which does the same from
inside the script (``jax.config.update("jax_num_cpu_devices", 2)`` before any JAX
operation). The batch is ``--batch-per-device`` times the number of devices.

The last line printed is a JSON summary: ``devices``, ``max_abs_diff`` (the largest
over both routes, gradients and parameters), per-route differences and collectives,
the loss at the start and the end, and ``seconds``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import _common as common
import braintrace as bt
from braintrace import parallel
from braintrace.testing import models

ALGORITHMS = {
    "d_rtrl": lambda: bt.D_RTRL(),
    "pp_prop": lambda: bt.pp_prop(0.9),
    "snap1": lambda: bt.SnAp1(),
    "rtrl": lambda: bt.RTRL(),
    "uoro": lambda: bt.UORO(),
}
COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")
N_IN = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument(
        "--algorithm", choices=sorted(ALGORITHMS), default="d_rtrl", help="online algorithm"
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="split the CPU into this many XLA devices (0: leave JAX's default)",
    )
    parser.add_argument("--batch-per-device", type=int, default=4, help="samples on each device")
    parser.add_argument("--hidden", type=int, default=16, help="GRU units")
    parser.add_argument("--steps", type=int, default=40, help="time steps per episode")
    parser.add_argument(
        "--episodes", type=int, default=3, help="episodes (a fresh state, then Adam per step)"
    )
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data")
    return parser.parse_args(argv)


def use_cpu_devices(n: int) -> None:
    """Run on ``n`` CPU devices: must come before JAX's first operation."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def memory_task(key, episodes: int, steps: int, batch: int):
    """Time-major ``(E, T, B, N_IN)`` inputs; targets ``(x_{t-1}[0], x_{t-2}[1])``."""
    xs = jax.random.normal(key, (episodes, steps, batch, N_IN), jnp.float32)
    pad = jnp.zeros((episodes, 2, batch, N_IN), jnp.float32)
    past = jnp.concatenate([pad, xs], axis=1)
    targets = jnp.stack([past[:, 1:-1, :, 0], past[:, :-2, :, 1]], axis=-1)
    return xs, targets


def make_episode(learner, step, optimizer, mesh=None):
    """One episode of online training: a fresh state, then an Adam update per step.

    ``step`` is ``learner.step`` or its data-parallel wrapping; with a ``mesh`` the
    fresh state is split over it (its zeros would otherwise be kept whole on every
    device). Returns the new parameters and optimiser state, the losses and every
    step's gradient.
    """

    def episode(params, opt_state, state, xs, targets):
        state = learner.reset(state)
        if mesh is not None:
            state = parallel.shard_state(state, mesh)

        def body(carry, inputs):
            params, opt_state, state = carry
            (loss, _), grads, state = step(params, state, *inputs)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, state), (loss, grads)

        carry, (losses, grads) = lax.scan(body, (params, opt_state, state), (xs, targets))
        params, opt_state, state = carry
        return params, opt_state, state, losses, grads

    return episode


def count_collectives(hlo: str) -> dict:
    """How many of each cross-device operation the compiled program holds."""
    return {op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES}


def train(episode, params, opt_state, state, data, place=None, mesh=None) -> dict:
    """Compile ``episode`` once (ahead of time, to read its program) and run every episode.

    ``place`` puts each episode's inputs and targets on the devices; ``mesh`` is set
    as the current mesh while tracing (the jit route).
    """
    place = place or (lambda a: a)
    xs, targets = data
    args = (params, opt_state, state, place(xs[0]), place(targets[0]))
    if mesh is None:
        compiled = jax.jit(episode).lower(*args).compile()
    else:
        with jax.set_mesh(mesh):
            compiled = jax.jit(episode).lower(*args).compile()
    losses, grads = [], []
    for e in range(xs.shape[0]):
        params, opt_state, state, loss, grad = compiled(
            params, opt_state, state, place(xs[e]), place(targets[e])
        )
        losses.append(loss)
        grads.append(grad)
    return {
        "params": params,
        "state": state,
        "losses": np.concatenate([np.asarray(a) for a in losses]),
        "grads": grads,
        "collectives": count_collectives(compiled.as_text()),
    }


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two pytrees of the same structure."""
    diffs = jax.tree_util.tree_map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


def split_over_devices(tree, mesh) -> bool:
    """Whether every leaf is split over all of the mesh's devices (one slice each)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return all(len({repr(s.index) for s in a.addressable_shards}) == mesh.size for a in leaves)


def run_routes(args, learner, optimizer, params, hidden, data, mesh) -> dict:
    """Train on one device, then with each data-parallel route; ``{route: run}``."""
    opt_state = optimizer.init(params)
    state = learner.init(params, hidden, data[0][0, 0])
    runs = {
        "one_device": train(
            make_episode(learner, learner.step, optimizer), params, opt_state, state, data
        )
    }
    placed = (
        parallel.replicate(params, mesh),
        parallel.replicate(opt_state, mesh),
        parallel.shard_state(state, mesh),
    )
    place = lambda a: parallel.shard_batch(a, mesh, time_major=True)
    routes = {
        "shard_map": (parallel.data_parallel(learner.step, mesh), None),
        "jit": (learner.step, mesh),
    }
    for name, (step, context) in routes.items():
        episode = make_episode(learner, step, optimizer, mesh)
        runs[name] = train(episode, *placed, data, place=place, mesh=context)
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cpu_devices:
        use_cpu_devices(args.cpu_devices)
    start = time.perf_counter()
    mesh = parallel.batch_mesh()
    batch = args.batch_per_device * mesh.size
    key_params, key_data = jax.random.split(jax.random.PRNGKey(args.seed))
    params = models.gru_params(args.seed, n_in=N_IN, n=args.hidden, dtype=jnp.float32)
    hidden = jnp.zeros((batch, args.hidden), jnp.float32)
    data = memory_task(key_data, args.episodes, args.steps, batch)
    learner = bt.compile(models.gru_step, models.mse, ALGORITHMS[args.algorithm](), batched=True)
    runs = run_routes(args, learner, optax.adam(args.lr), params, hidden, data, mesh)

    reference = runs.pop("one_device")
    diffs = {
        name: {
            "grads": max_abs_diff(run["grads"], reference["grads"]),
            "params": max_abs_diff(run["params"], reference["params"]),
            "losses": float(np.max(np.abs(run["losses"] - reference["losses"]))),
        }
        for name, run in runs.items()
    }
    losses = reference["losses"]
    return common.print_summary(
        {
            "example": "data_parallel",
            "devices": mesh.size,
            "platform": jax.devices()[0].platform,
            "algorithm": args.algorithm,
            "batch": batch,
            "max_abs_diff": max(max(d["grads"], d["params"]) for d in diffs.values()),
            "max_abs_diff_by_route": diffs,
            "state_split_over_devices": {
                name: split_over_devices(run["state"], mesh) for name, run in runs.items()
            },
            "collectives": {name: run["collectives"] for name, run in runs.items()},
            "loss_first_steps": float(losses[: args.steps // 4].mean()),
            "loss_last_steps": float(losses[-(args.steps // 4) :].mean()),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )


if __name__ == "__main__":
    main()
