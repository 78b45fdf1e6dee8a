"""Checkpoint an online run mid-stream with Orbax, resume it in a new process: bit-identical.

An online learner's state is more than its parameters: the optimiser state, and the
learner's own state (the hidden state, the eligibility traces, the per-sample update
counts; a random algorithm keeps its per-sample keys there as raw ``uint32`` data),
and here the key of the data stream. All of it is a pytree of arrays, so one Orbax
checkpoint holds it. This script trains a GRU online on a long stream (an Adam
update after every step, or after every window of steps), saves everything after
step ``k``, and lets a **new process** restore the checkpoint and run the rest of
the stream. The resumed run must end bit-identical to the uninterrupted one, for
every face (the core learner, linen, NNX, Equinox) and every algorithm given.

As a control, the new process also resumes once with the traces zeroed (everything
else restored): that run must differ, or the traces did not matter.

Run
---
``python examples/resume_stream.py``                       (every face and algorithm)
``python examples/resume_stream.py --faces nnx --algorithms d_rtrl``

The last stdout line is a JSON summary: ``bit_identical`` (all cases), and per case
``bit_identical``, ``max_abs_diff`` and ``max_abs_diff_without_traces``.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import _common as common
import braintrace as bt
import braintrace_eqx as bte
import braintrace_flax as btf
from braintrace.testing import models
from braintrace_flax import nnx as btnnx

#: name -> (algorithm, steps per update: 1 = per step, k = windows of k steps)
ALGORITHMS = {
    "d_rtrl": (lambda: bt.D_RTRL(), 1),
    "pp_prop": (lambda: bt.pp_prop(0.9, warmup_correction=True), 1),
    "window": (lambda: bt.D_RTRL(), 4),
}
FACES = ("core", "linen", "nnx", "eqx")
B, N_IN, N = 4, 3, 8


def parse_args(argv=None) -> argparse.Namespace:
    p = common.argument_parser(__doc__)
    p.add_argument(
        "--faces", nargs="+", choices=FACES, default=list(FACES), help="learner faces to run"
    )
    p.add_argument(
        "--algorithms",
        nargs="+",
        choices=sorted(ALGORITHMS),
        default=sorted(ALGORITHMS),
        help="online algorithms ('window': D-RTRL in windows of 4 steps)",
    )
    p.add_argument("--steps", type=int, default=48, help="time steps in the stream")
    p.add_argument("--checkpoint-at", type=int, default=24, help="steps before the checkpoint (k)")
    p.add_argument(
        "--dir", type=pathlib.Path, default=None, help="checkpoint folder (default: temp)"
    )
    p.add_argument(
        "--resume", action="store_true", help="(the new process) restore and finish the stream"
    )
    common.add_run_flags(
        p, quick_help="a stream of 16 steps", verbose_help="print each case's result", plot=False
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.checkpoint_at = 16, 8
    for name in args.algorithms:
        if args.checkpoint_at % ALGORITHMS[name][1] or args.steps % ALGORITHMS[name][1]:
            p.error("--steps and --checkpoint-at must be multiples of the window (4)")
    return args


# -- the stream: inputs and targets drawn from a key the run carries ------------------------


def next_chunk(key, steps: int):
    """``(key, xs, ys)``: the stream's next ``steps`` steps, time-major ``(steps, B, ...)``."""
    key, sub = jax.random.split(key)
    xs = jax.random.normal(sub, (steps, B, N_IN), jnp.float32)
    ys = 0.5 * jnp.tanh(xs @ jnp.linspace(-1.0, 1.0, N_IN * 2).reshape(N_IN, 2))
    return key, xs, ys


def mse(out, y):
    return jnp.sum((out[..., :2] - y) ** 2)


# -- the faces: each builds its learner and trainable state, and one jitted update ----------


class _EqxNet(eqx.Module):
    cell: bte.ETPGRUCell

    def __call__(self, x, hidden):
        hidden = self.cell(x, hidden)
        return hidden, hidden


def build(face: str, algorithm):
    """``(learner, trained, optimizer state or NNX optimizer, hidden, x0)`` for ``face``."""
    tx, hidden = optax.adam(1e-2), jnp.zeros((B, N), jnp.float32)
    x0 = jnp.zeros((B, N_IN), jnp.float32)
    if face == "core":
        params = models.gru_params(0, n_in=N_IN, n=N, dtype=jnp.float32)
        return bt.compile(models.gru_step, mse, algorithm), params, tx.init(params), hidden, x0
    if face == "linen":
        cell = nn.GRUCell(N)
        params = cell.init(jax.random.PRNGKey(0), hidden, x0)["params"]
        learner = btf.compile(cell, mse, algorithm, convert_dense=True)
        return learner, params, tx.init(params), hidden, x0
    if face == "nnx":
        cell = btnnx.convert(nnx.GRUCell(N_IN, N, rngs=nnx.Rngs(0)))
        optimizer = nnx.Optimizer(cell, tx, wrt=nnx.Param)
        return btnnx.compile(cell, mse, algorithm), cell, optimizer, hidden, x0
    model = _EqxNet(bte.ETPGRUCell(N_IN, N, dtype=jnp.float32, key=jax.random.PRNGKey(0)))
    learner = bte.compile(model, mse, algorithm)
    return learner, model, tx.init(learner.params(model)), hidden, x0


def make_update(face: str, learner, window: int):
    """``update(trained, opt, state, xs, ys) -> (trained, opt, state)``: one learner
    step (or window) and one Adam update, jitted for the face."""
    tx = optax.adam(1e-2)

    def learn(trained, state, xs, ys):
        if window == 1:
            return learner.step(trained, state, xs[0], ys[0])
        return learner.window(trained, state, xs, ys)

    if face == "nnx":

        @nnx.jit
        def nnx_update(model, optimizer, state, xs, ys):
            _, grads, state = learn(model, state, xs, ys)
            optimizer.update(model, grads)
            return model, optimizer, state

        return nnx_update

    def update(trained, opt_state, state, xs, ys):
        _, grads, state = learn(trained, state, xs, ys)
        params = learner.params(trained) if face == "eqx" else trained
        updates, opt_state = tx.update(grads, opt_state, params)
        apply = eqx.apply_updates if face == "eqx" else optax.apply_updates
        return apply(trained, updates), opt_state, state

    return eqx.filter_jit(update) if face == "eqx" else jax.jit(update)


# -- what a checkpoint holds -------------------------------------------------------------------


def arrays_of(face: str, run: dict) -> dict:
    """Every array the run carries, as lists of leaves (the templates give the structure)."""
    trained, opt = run["trained"], run["opt"]
    if face == "nnx":
        trained, opt = nnx.state(trained), nnx.state(opt)
    elif face == "eqx":
        trained = eqx.filter(trained, eqx.is_array)
    leaves = jax.tree_util.tree_leaves
    return {
        "trained": leaves(trained),
        "opt": leaves(opt),
        "learner": leaves(run["state"]),
        "key": run["key"],
        "step": run["step"],
    }


def with_arrays(face: str, run: dict, saved: dict) -> dict:
    """``run`` (a freshly built one: the templates) with the saved arrays put back."""
    put = lambda tree, leaves: jax.tree_util.tree_unflatten(  # noqa: E731
        jax.tree_util.tree_structure(tree), leaves
    )
    run = dict(run, key=saved["key"], step=int(saved["step"]))
    run["state"] = put(run["state"], saved["learner"])
    if face == "nnx":
        nnx.update(run["trained"], put(nnx.state(run["trained"]), saved["trained"]))
        nnx.update(run["opt"], put(nnx.state(run["opt"]), saved["opt"]))
        return run
    if face == "eqx":
        arrays, static = eqx.partition(run["trained"], eqx.is_array)
        run["trained"] = eqx.combine(put(arrays, saved["trained"]), static)
    else:
        run["trained"] = put(run["trained"], saved["trained"])
    run["opt"] = put(run["opt"], saved["opt"])
    return run


def save(path: pathlib.Path, tree) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.resolve(), tree, force=True)


def restore(path: pathlib.Path, template):
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.resolve(), abstract)


# -- the run -----------------------------------------------------------------------------------


def fresh_run(face: str, name: str, seed: int) -> tuple:
    """``(update, run)``: a new learner, model, optimiser and stream at step 0."""
    make_algorithm, window = ALGORITHMS[name]
    learner, trained, opt, hidden, x0 = build(face, make_algorithm())
    state = learner.init(trained, hidden, x0)
    run = {"trained": trained, "opt": opt, "state": state, "key": jax.random.PRNGKey(seed)}
    return make_update(face, learner, window), dict(run, step=0, window=window)


def advance(update, run: dict, until: int) -> dict:
    """Train on the stream from ``run['step']`` up to step ``until``."""
    trained, opt, state, key = run["trained"], run["opt"], run["state"], run["key"]
    for _ in range(run["step"], until, run["window"]):
        key, xs, ys = next_chunk(key, run["window"])
        trained, opt, state = update(trained, opt, state, xs, ys)
    return dict(run, trained=trained, opt=opt, state=state, key=key, step=until)


def first_process(args, folder: pathlib.Path) -> dict:
    """Uninterrupted runs, each checkpointed at step k on the way: their final arrays."""
    finals = {}
    for face in args.faces:
        for name in args.algorithms:
            update, run = fresh_run(face, name, args.seed)
            run = advance(update, run, args.checkpoint_at)
            save(folder / f"{face}-{name}", arrays_of(face, run))
            finals[f"{face}/{name}"] = arrays_of(face, advance(update, run, args.steps))
    return finals


def second_process(args, folder: pathlib.Path) -> None:
    """Restore every checkpoint into a freshly built run and finish the stream; the
    control resumes with zeroed traces. Both results are saved for the first process."""
    for face in args.faces:
        for name in args.algorithms:
            update, template = fresh_run(face, name, args.seed)
            saved = restore(folder / f"{face}-{name}", arrays_of(face, template))
            run = with_arrays(face, template, saved)
            control = dict(run, state=run["state"]._replace(traces=_zeros(run["state"].traces)))
            if face == "nnx":  # NNX objects change in place: the control gets its own copies
                control["trained"], control["opt"] = (
                    nnx.clone(run["trained"]),
                    nnx.clone(run["opt"]),
                )
            done = arrays_of(face, advance(update, run, args.steps))
            save(folder / f"{face}-{name}-resumed", done)
            save(
                folder / f"{face}-{name}-control",
                arrays_of(face, advance(update, control, args.steps)),
            )


def _zeros(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def compare(a, b) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two lists of leaves."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    same = len(la) == len(lb) and all(
        np.asarray(u).dtype == np.asarray(v).dtype
        and np.asarray(u).tobytes() == np.asarray(v).tobytes()
        for u, v in zip(la, lb)
    )
    diffs = [
        float(np.max(np.abs(np.asarray(u, float) - np.asarray(v, float)), initial=0.0))
        for u, v in zip(la, lb)
    ]
    return same, max(diffs, default=0.0)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        folder = (args.dir or pathlib.Path(scratch)).resolve()
        if args.resume:
            return second_process(args, folder)
        finals = first_process(args, folder)
        argv = [*(argv if argv is not None else sys.argv[1:]), "--resume", "--dir", str(folder)]
        subprocess.run([sys.executable, __file__, *argv], check=True)
        cases = {}
        for case, final in finals.items():
            stem = folder / case.replace("/", "-")
            same, diff = compare(restore(pathlib.Path(f"{stem}-resumed"), final), final)
            _, control = compare(restore(pathlib.Path(f"{stem}-control"), final), final)
            cases[case] = {
                "bit_identical": same,
                "max_abs_diff": diff,
                "max_abs_diff_without_traces": control,
            }
            if args.verbose:
                print(case, cases[case])
    return common.print_summary(
        {
            "example": "resume_stream",
            "bit_identical": all(c["bit_identical"] for c in cases.values()),
            "cases": cases,
            "steps": args.steps,
            "checkpoint_at": args.checkpoint_at,
            "seconds": round(time.perf_counter() - start, 1),
        }
    )


if __name__ == "__main__":
    main()
