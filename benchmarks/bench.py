"""Time and memory of the online algorithms against BPTT, as ratios in one run.

For a vanilla RNN, a GRU and a recurrent 2-state LIF network (ETP dense layers,
``n`` hidden units, batch ``B``, ``--n-in`` inputs), it measures per time step,
jitted and after warm-up, ``learner.scan`` for BPTT, OneStep, pp_prop, D-RTRL,
SnAp-1 and UORO (interleaved repeats, median). D-RTRL is compared with its bandwidth bound: one
in-place read-modify-write pass over arrays of the traces' total size per step,
timed in the same process; "traffic" is the trace bytes that bound moves per second.
"floor" is OneStep plus the bound: D-RTRL does OneStep's work and at least that pass.
``--memory`` adds the compiled temp memory as T grows (and ``--plot PATH`` plots
it). ``--rtrl`` times RTRL instead, against BPTT at each of n = 8, 16, 32, 64, with
its influence memory per sample (it grows as ``H P``, its time as ``H^2 P``).
Nothing is written unless asked. The last stdout line is a JSON object.

    python benchmarks/bench.py --quick        # small sizes, about a minute on 2 CPU cores
    python benchmarks/bench.py                # n=256, B=32, 8 inputs (the README table)
    python benchmarks/bench.py --rtrl         # RTRL's growth with n (B=32)
    python benchmarks/bench.py --ops          # each ETP op's D-RTRL / pp_prop vs BPTT
    python benchmarks/bench.py --n 1024 --B 256 --memory
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import braintrace as bt
from braintrace.testing import models as M

MODELS = {
    "rnn": (M.rnn_step, M.rnn_params, None),
    "gru": (M.gru_step, M.gru_params, None),
    "lif": (M.rlif_step, M.rlif_params, ("i", "v")),
}
ALGORITHMS = {
    "bptt": bt.BPTT(),
    "one_step": bt.OneStep(),
    "pp_prop": bt.pp_prop(0.9),
    "d_rtrl": bt.D_RTRL(),
    "snap1": bt.SnAp1(),
    "uoro": bt.UORO(),
}


def _setup(model, n, batch, t, n_in):
    step, make_params, names = MODELS[model]
    params = make_params(0, n_in, n, dtype=jnp.float32)
    shape = (batch, n)
    hidden = {k: jnp.zeros(shape) for k in names} if names else jnp.zeros(shape)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    xs = jax.random.normal(k1, (t, batch, n_in))
    targets = jax.random.normal(k2, (t, batch, 2))
    return step, params, hidden, xs, targets


def _median_seconds(fn, args, repeats) -> list:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return samples


def _bound_runner(traces, t):
    """``t`` steps of one read-modify-write pass over every trace array."""
    leaves = jax.tree_util.tree_leaves(traces)

    @jax.jit
    def run(leaves):
        def body(carry, _):
            return [0.9 * a + 1e-3 for a in carry], None

        return jax.lax.scan(body, leaves, None, length=t)[0]

    return run, (leaves,)


def time_per_step(model, n, batch, t, n_in, repeats, algorithms=None) -> tuple[dict, int]:
    """Median seconds per step per algorithm and the bound, and the trace bytes."""
    step, params, hidden, xs, targets = _setup(model, n, batch, t, n_in)
    runs = {}
    for name, algo in (algorithms or ALGORITHMS).items():
        learner = bt.compile(step, M.mse, algo, batched=True)
        state = learner.init(params, hidden, xs[0])
        runs[name] = (jax.jit(learner.scan), (params, state, xs, targets))
    traces = runs["d_rtrl" if "d_rtrl" in runs else list(runs)[-1]][1][1].traces
    runs["bound"] = _bound_runner(traces, t)
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    samples = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all alike
        for name, (fn, args) in runs.items():
            samples[name] += _median_seconds(fn, args, 1)
    trace_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(traces))
    return {k: statistics.median(v) / t for k, v in samples.items()}, trace_bytes


def temp_bytes(model, n, batch, t, n_in) -> dict:
    """Compiled temp memory of ``learner.scan`` over ``t`` steps, per algorithm."""
    step, params, hidden, xs, targets = _setup(model, n, batch, 1, n_in)
    xs = jax.ShapeDtypeStruct((t,) + xs.shape[1:], xs.dtype)
    targets = jax.ShapeDtypeStruct((t,) + targets.shape[1:], targets.dtype)
    out = {}
    for name, algo in ALGORITHMS.items():
        learner = bt.compile(step, M.mse, algo, batched=True)
        state = learner.init(params, hidden, jnp.zeros(xs.shape[1:], xs.dtype))
        compiled = jax.jit(learner.scan).lower(params, state, xs, targets).compile()
        out[name] = compiled.memory_analysis().temp_size_in_bytes
    return out


def plot_memory(memory, lengths, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(memory), figsize=(4 * len(memory), 3.2), squeeze=False)
    for ax, (model, per_t) in zip(axes[0], memory.items()):
        for name in ALGORITHMS:
            ax.loglog(lengths, [max(per_t[t][name], 1) / 2**20 for t in lengths], "o-", label=name)
        ax.set_title(model)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("compiled temp memory (MiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"memory plot: {path}")


def _row(per_step: dict, trace_bytes: int) -> dict:
    ms = {k: round(v * 1e3, 4) for k, v in per_step.items()}
    return {
        "ms_per_step": ms,
        "pp_prop_over_bptt": round(per_step["pp_prop"] / per_step["bptt"], 3),
        "d_rtrl_over_bptt": round(per_step["d_rtrl"] / per_step["bptt"], 3),
        "snap1_over_d_rtrl": round(per_step["snap1"] / per_step["d_rtrl"], 3),
        "uoro_over_bptt": round(per_step["uoro"] / per_step["bptt"], 3),
        "d_rtrl_over_bound": round(per_step["d_rtrl"] / per_step["bound"], 3),
        # D-RTRL does OneStep's work and at least one pass over the traces.
        "d_rtrl_over_floor": round(
            per_step["d_rtrl"] / (per_step["one_step"] + per_step["bound"]), 3
        ),
        "trace_MiB": round(trace_bytes / 2**20, 2),
        "bound_GB_per_s": round(2 * trace_bytes / per_step["bound"] / 1e9, 1),
    }


def _print_table(result: dict) -> None:
    names = [*ALGORITHMS, "bound"]
    header = (
        f"{'model':<6}"
        + "".join(f"{n:>10}" for n in names)
        + f"{'pp/bptt':>9}{'dr/bound':>9}{'dr/floor':>9}{'snap/dr':>9}{'uoro/bptt':>10}"
        + f"{'GB/s':>7}"
    )
    print("ms per step")
    print(header)
    print("-" * len(header))
    for model, r in result.items():
        cells = "".join(f"{r['ms_per_step'][n]:>10.3f}" for n in names)
        print(
            f"{model:<6}{cells}{r['pp_prop_over_bptt']:>9.2f}{r['d_rtrl_over_bound']:>9.2f}"
            f"{r['d_rtrl_over_floor']:>9.2f}{r['snap1_over_d_rtrl']:>9.2f}"
            f"{r['uoro_over_bptt']:>10.2f}{r['bound_GB_per_s']:>7.1f}"
        )


def rtrl_growth(models, sizes, batch, t, n_in, repeats) -> dict:
    """RTRL against BPTT at each hidden size: ms per step, ratio, influence KiB per sample."""
    algos = {"bptt": bt.BPTT(), "rtrl": bt.RTRL()}
    result: dict = {}
    print(f"RTRL against BPTT (B={batch}, T={t}): ms per step, ratio, influence per sample")
    for model in models:
        for n in sizes:
            per_step, trace_bytes = time_per_step(model, n, batch, t, n_in, repeats, algos)
            row = {
                "bptt_ms": round(per_step["bptt"] * 1e3, 4),
                "rtrl_ms": round(per_step["rtrl"] * 1e3, 4),
                "rtrl_over_bptt": round(per_step["rtrl"] / per_step["bptt"], 2),
                "influence_KiB_per_sample": round(trace_bytes / batch / 1024, 1),
            }
            result[f"{model}/n={n}"] = row
            print(
                f"{model:<5} n={n:<4} bptt {row['bptt_ms']:>8.3f}  rtrl {row['rtrl_ms']:>9.3f}"
                f"  x{row['rtrl_over_bptt']:<8} {row['influence_KiB_per_sample']:>9.1f} KiB"
            )
    return result


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    parser.add_argument("--n", type=int, default=None, help="hidden units (default 256)")
    parser.add_argument("--B", type=int, default=None, help="batch size (default 32)")
    parser.add_argument("--n-in", type=int, default=8, help="inputs per step (default 8)")
    parser.add_argument("--T", type=int, default=None, help="steps per timed scan")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--memory", action="store_true", help="also sweep compiled memory in T")
    parser.add_argument("--plot", default="", help="PNG path for the memory sweep (off)")
    parser.add_argument(
        "--rtrl", action="store_true", help="time RTRL against BPTT for n = 8, 16, 32, 64"
    )
    parser.add_argument(
        "--ops", action="store_true", help="time each op's D-RTRL and pp_prop against BPTT"
    )
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    n = args.n or (64 if args.quick else 256)
    batch = args.B or (8 if args.quick else 32)
    t = args.T or (50 if args.quick else 200)
    repeats = args.repeats or (3 if args.quick else 7)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), n={n}, B={batch}, "
        f"n_in={args.n_in}, timed T={t}, repeats={repeats}"
    )
    if args.ops:
        from ops_bench import run_ops  # benchmarks/ops_bench.py, beside this script

        rows = run_ops(batch, t, repeats)
        print(json.dumps({"device": device.device_kind, "B": batch, "T": t, "ops": rows}))
        return
    if args.rtrl:
        growth = rtrl_growth(models, (8, 16, 32, 64), batch, t, args.n_in, repeats)
        print(json.dumps({"device": device.device_kind, "B": batch, "rtrl": growth}))
        return
    result = {m: _row(*time_per_step(m, n, batch, t, args.n_in, repeats)) for m in models}
    _print_table(result)
    if args.memory or args.plot:
        lengths = (100, 1000, 10000)
        memory = {m: {k: temp_bytes(m, n, batch, k, args.n_in) for k in lengths} for m in models}
        for m in models:
            result[m]["temp_MiB"] = {
                str(k): {a: round(v / 2**20, 3) for a, v in memory[m][k].items()} for k in lengths
            }
            print(m, "temp MiB by T:", result[m]["temp_MiB"])
        if args.plot:
            plot_memory(memory, lengths, args.plot)
    print(
        json.dumps(
            {
                "device": device.device_kind,
                "backend": jax.default_backend(),
                "n": n,
                "B": batch,
                "n_in": args.n_in,
                **result,
            }
        )
    )


if __name__ == "__main__":
    main()
