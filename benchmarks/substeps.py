"""What LIF sub-steps cost: ms per input step of ``examples/eqx_lif_snn.py``'s model.

The model integrates each input frame over ``N`` LIF sub-steps with a
``lax.fori_loop`` (``--substeps N`` in the example); the compiler moves the cell's
ETP ops before the loop and composes ``D`` and ``D_f`` through it
(``docs/algorithms.md``, "Control flow"). For N = 1, 4, 16 this times, in one
process (jitted, after warm-up, interleaved repeats, median), one D-RTRL
``learner.step`` and one step of BPTT over a 20-step window, per input step, and
prints the ratios to N = 1. The last stdout line is a JSON object.

    python benchmarks/substeps.py            # batch 64, 64 neurons, 20 inputs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import braintrace as bt
import braintrace_eqx as bte

HERE = pathlib.Path(__file__).resolve().parent


def _example():
    sys.path.insert(0, str(HERE.parent / "examples"))  # the example imports _common
    spec = importlib.util.spec_from_file_location(
        "eqx_lif_snn", HERE.parent / "examples" / "eqx_lif_snn.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _runner(example, args, substeps: int, algorithm, steps: int):
    ns = argparse.Namespace(hidden=args.hidden, substeps=substeps)
    model = example.init_model(jax.random.PRNGKey(0), args.inputs, ns)
    learner = bte.compile(model, example.cross_entropy, algorithm)
    xs = jnp.ones((steps, args.batch, args.inputs))
    targets = jnp.zeros((steps, args.batch, 2))
    hidden = example.zero_state(args.batch, args.hidden)
    state = learner.init(model, hidden, xs[0])
    run = jax.jit(lambda m, s: learner.scan(m, s, xs, targets)[1])
    jax.block_until_ready(run(model, state))
    return lambda: jax.block_until_ready(run(model, state))


def _median_ms(fns: dict, repeats: int, steps: int) -> dict:
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) / steps for k, v in samples.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--inputs", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    example = _example()
    algorithms = {"d_rtrl": bt.D_RTRL(), "bptt": bt.BPTT()}
    fns = {
        (name, n): _runner(example, args, n, algo, args.steps)
        for n in (1, 4, 16)
        for name, algo in algorithms.items()
    }
    ms = _median_ms(fns, args.repeats, args.steps)
    rows = {}
    print(f"{'N':>3}  {'d_rtrl ms':>9}  {'x N=1':>6}  {'bptt ms':>8}  {'x N=1':>6}")
    for n in (1, 4, 16):
        d, b = ms[("d_rtrl", n)], ms[("bptt", n)]
        rows[n] = {"d_rtrl_ms": d, "bptt_ms": b}
        print(
            f"{n:>3}  {d:9.3f}  {d / ms[('d_rtrl', 1)]:6.2f}  {b:8.3f}  {b / ms[('bptt', 1)]:6.2f}"
        )
    result = {"benchmark": "substeps", "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
