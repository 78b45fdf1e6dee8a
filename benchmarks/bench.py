"""Time and memory of the online algorithms against BPTT, as ratios in one run.

For a vanilla RNN, a GRU and a recurrent 2-state LIF network (ETP dense layers,
batch B, hidden n), measures per time step, jitted and after warm-up, the cost of
``learner.scan`` for D-RTRL, pp_prop and BPTT (interleaved repeats, median), and the
compiled temp memory (``memory_analysis()``) as T grows. D-RTRL is also compared
with its bandwidth bound: a plain update of a ``B x I x O`` trace per step, timed in
the same process. The last stdout line is a JSON object.

    python benchmarks/bench.py --quick        # < 2 minutes on 2 CPU cores
    python benchmarks/bench.py                # n=256, B=32 (the documented run)
    python benchmarks/bench.py --n 512        # the largest documented size
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import braintrace as bt  # noqa: E402
import models as M  # noqa: E402

MODELS = {
    "rnn": (M.rnn_step, M.rnn_params, None),
    "gru": (M.gru_step, M.gru_params, None),
    "lif": (M.rlif_step, M.rlif_params, ("i", "v")),
}
ALGORITHMS = {"bptt": bt.BPTT(), "drtrl": bt.D_RTRL(), "pp_prop": bt.pp_prop(0.9)}


def _setup(model, n, batch, t, n_in):
    step, make_params, names = MODELS[model]
    params = make_params(0, n_in, n, dtype=jnp.float32)
    shape = (batch, n)
    hidden = {k: jnp.zeros(shape) for k in names} if names else jnp.zeros(shape)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    xs = jax.random.normal(k1, (t, batch, n_in))
    targets = jax.random.normal(k2, (t, batch, 2))
    return step, params, hidden, xs, targets


def _runner(step, algo, params, hidden, x0):
    learner = bt.compile(step, M.mse, algo, batched=True)
    state = learner.init(params, hidden, x0)
    return jax.jit(learner.scan), state


def _block(tree):
    return jax.block_until_ready(tree)


def time_per_step(model, n, batch, t, n_in, repeats):
    """Median seconds per time step for each algorithm (interleaved repeats)."""
    step, params, hidden, xs, targets = _setup(model, n, batch, t, n_in)
    runs = {}
    for name, algo in ALGORITHMS.items():
        fn, state = _runner(step, algo, params, hidden, xs[0])
        _block(fn(params, state, xs, targets))  # compile + warm-up
        runs[name] = (fn, state)
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, state) in runs.items():
            start = time.perf_counter()
            _block(fn(params, state, xs, targets))
            samples[name].append((time.perf_counter() - start) / t)
    return {name: statistics.median(v) for name, v in samples.items()}


def bandwidth_bound(model, n, batch, t, n_in, repeats):
    """Seconds per step of a plain read-modify-write of every D-RTRL trace (same sizes)."""
    step, params, hidden, xs, targets = _setup(model, n, batch, t, n_in)
    learner = bt.compile(step, M.mse, bt.D_RTRL(), batched=True)
    traces = learner.init(params, hidden, xs[0]).traces
    leaves = jax.tree_util.tree_leaves(traces)

    @jax.jit
    def run(leaves):
        def body(carry, _):
            return [0.9 * a + 1e-3 for a in carry], None

        return jax.lax.scan(body, leaves, None, length=t)[0]

    _block(run(leaves))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(run(leaves))
        samples.append((time.perf_counter() - start) / t)
    return statistics.median(samples)


def temp_bytes(model, n, batch, t, n_in):
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


def plot_memory(memory, lengths, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(1, len(memory), figsize=(4 * len(memory), 3.2), squeeze=False)
    for ax, (model, per_t) in zip(axes[0], memory.items()):
        for name in ALGORITHMS:
            ax.loglog(lengths, [max(per_t[t][name], 1) / 2**20 for t in lengths], "o-",
                      label=name)
        ax.set_title(model)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("compiled temp memory (MiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"memory plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 2 min on 2 cores")
    parser.add_argument("--n", type=int, default=None, help="hidden units (default 256)")
    parser.add_argument("--B", type=int, default=None, help="batch size (default 32)")
    parser.add_argument("--T", type=int, default=None, help="steps per timed scan")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--plot", default="docs/memory_vs_T.png", help="PNG path ('' off)")
    args = parser.parse_args()

    n = args.n or (64 if args.quick else 256)
    batch = args.B or (8 if args.quick else 32)
    t = args.T or (50 if args.quick else 200)
    repeats = args.repeats or (3 if args.quick else 7)
    n_in = n
    lengths = (100, 1000, 10000)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), n={n}, B={batch}, "
          f"timed T={t}, repeats={repeats}")

    result, memory = {}, {}
    for model in models:
        per_step = time_per_step(model, n, batch, t, n_in, repeats)
        bound = bandwidth_bound(model, n, batch, t, n_in, repeats)
        memory[model] = {length: temp_bytes(model, n, batch, length, n_in) for length in lengths}
        result[model] = {
            "ms_per_step": {k: round(v * 1e3, 4) for k, v in per_step.items()},
            "pp_prop_over_bptt": round(per_step["pp_prop"] / per_step["bptt"], 3),
            "drtrl_over_bptt": round(per_step["drtrl"] / per_step["bptt"], 3),
            "drtrl_over_bandwidth_bound": round(per_step["drtrl"] / bound, 3),
            "mem_T10000_over_T100": {
                k: round(memory[model][10000][k] / max(memory[model][100][k], 1), 3)
                for k in ALGORITHMS
            },
            "temp_MiB": {
                str(length): {k: round(v / 2**20, 3) for k, v in memory[model][length].items()}
                for length in lengths
            },
        }

    header = f"{'model':<6}{'algo':<9}{'ms/step':>10}{'/bptt':>8}{'mem T=100':>12}" \
             f"{'T=10000':>12}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for model, r in result.items():
        for name in ALGORITHMS:
            ratio = r["ms_per_step"][name] / r["ms_per_step"]["bptt"]
            mem = r["temp_MiB"]
            print(f"{model:<6}{name:<9}{r['ms_per_step'][name]:>10.4f}{ratio:>8.2f}"
                  f"{mem['100'][name]:>11.2f}M{mem['10000'][name]:>11.2f}M"
                  f"{r['mem_T10000_over_T100'][name]:>8.2f}")
        print(f"{'':<6}{'bound':<9}  D-RTRL / bandwidth bound = "
              f"{r['drtrl_over_bandwidth_bound']:.2f}")
    if args.plot:
        plot_memory(memory, lengths, args.plot)
    print(json.dumps({"device": jax.devices()[0].device_kind, "n": n, "B": batch, **result}))


if __name__ == "__main__":
    main()
