"""Alignment of the online gradients with BPTT on the approximate class, per window.

For a tanh RNN with a recurrent ETP weight, a GRU built from ETP dense ops and a
recurrent LIF network (T=50, B=8, n=32 by default, fixed seeds), prints the cosine
similarity, sign agreement and norm ratio of each algorithm's summed gradient
against BPTT's (float64), for windows of k = 1, 4 and 16 steps
(``learner.scan(..., window=k)``; k = 1 is the per-step learner):

- ``d_rtrl`` and ``pp_prop(0.9)``: exact inside a window, traces across its entry;
- ``tbptt``: ``OneStep`` windows, i.e. truncated BPTT over k steps with no traces:
  the control that shows what the traces add at the same window.

Figures are joint over all leaves but the readout ``ro`` (which every algorithm gets
exactly); ``--per-leaf`` adds the per-leaf breakdown. The last stdout line is a JSON
object keyed ``"<model>/<algorithm>/k=<k>"``, so runs can be compared. It takes
about a minute on 2 CPU cores.

    python benchmarks/alignment.py                 # the table the tests' floors come from
    python benchmarks/alignment.py --T 200         # longer sequences
    python benchmarks/alignment.py --windows 1 8 --per-leaf
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import braintrace as bt
from braintrace.testing import models as M
from braintrace.testing.reference import alignment, bptt_grad

jax.config.update("jax_enable_x64", True)

MODELS = {
    "rnn": (M.rnn_step, M.rnn_params, None),
    "gru": (M.gru_step, M.gru_params, None),
    "rlif": (M.rlif_step, M.rlif_params, ("i", "v")),
}
SKIP = ("ro",)  # the readout: exact for every algorithm, it would inflate the agreement


def algorithms(pp_decay: float) -> dict:
    """The algorithms compared, by the label the table and the JSON use."""
    return {
        "d_rtrl": bt.D_RTRL(),
        f"pp_prop({pp_decay:g})": bt.pp_prop(pp_decay),
        "tbptt": bt.OneStep(),
    }


def problem(model: str, args):
    """``(step, params, hidden, xs, targets)`` for one model, from fixed seeds."""
    step, make_params, names = MODELS[model]
    params = make_params(0, args.n_in, args.n)
    shape = (args.B, args.n)
    hidden = {k: jnp.zeros(shape) for k in names} if names else jnp.zeros(shape)
    k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
    xs = jax.random.normal(k1, (args.T, args.B, args.n_in))
    targets = jax.random.normal(k2, (args.T, args.B, 2))
    return step, params, hidden, xs, targets


def windowed_grads(step, algo, params, hidden, xs, targets, k: int):
    """The summed gradient of ``learner.scan`` with windows of ``k`` steps."""
    learner = bt.compile(step, M.mse, algo, batched=True)
    state = learner.init(params, hidden, xs[0])
    run = jax.jit(lambda p, s, x, y: learner.scan(p, s, x, y, window=k))
    return run(params, state, xs, targets)[1]


def _cell(stats: dict) -> str:
    return f"{stats['cosine']:>10.4f}{stats['sign']:>7.3f}{stats['norm_ratio']:>7.3f}"


def measure_model(model: str, args) -> dict:
    """Print one model's table and return its joint figures by ``"<algo>/k=<k>"``."""
    step, params, hidden, xs, targets = problem(model, args)
    reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
    print(f"\n== {model} (T={args.T}, B={args.B}, n={args.n}): cosine / sign / norm ratio ==")
    print(f"{'algorithm':<14}" + "".join(f"{f'k={k}':>24}" for k in args.windows))
    figures = {}
    for label, algo in algorithms(args.pp_decay).items():
        cells, leaves = [], []
        for k in args.windows:
            grads = windowed_grads(step, algo, params, hidden, xs, targets, k)
            joint = alignment(grads, reference, skip=SKIP)
            figures[f"{label}/k={k}"] = {name: round(v, 4) for name, v in joint.items()}
            cells.append(_cell(joint))
            leaves.append(
                {
                    leaf: alignment({leaf: grads[leaf]}, {leaf: reference[leaf]})
                    for leaf in sorted(params)
                    if leaf not in SKIP
                }
            )
        print(f"{label:<14}" + "".join(cells))
        if args.per_leaf:
            for leaf in leaves[0]:
                print(f"  {leaf:<12}" + "".join(_cell(per_k[leaf]) for per_k in leaves))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--T", type=int, default=50, help="sequence length")
    parser.add_argument("--B", type=int, default=8, help="batch size")
    parser.add_argument("--n", type=int, default=32, help="hidden units")
    parser.add_argument("--n-in", type=int, default=8, help="input features")
    parser.add_argument("--seed", type=int, default=3, help="data seed")
    parser.add_argument(
        "--windows", type=int, nargs="+", default=[1, 4, 16], help="window lengths k"
    )
    parser.add_argument("--pp-decay", type=float, default=0.9, help="pp_prop's trace decay")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--per-leaf", action="store_true", help="also print every leaf")
    args = parser.parse_args()

    summary = {
        "config": {
            "T": args.T,
            "B": args.B,
            "n": args.n,
            "n_in": args.n_in,
            "seed": args.seed,
            "skip": list(SKIP),
        }
    }
    for model in args.models:
        for key, figures in measure_model(model, args).items():
            summary[f"{model}/{key}"] = figures
    print(
        "\nJoint over all leaves but the readout 'ro' (exact for every algorithm). "
        "tbptt = OneStep windows: truncated BPTT over k steps, no traces."
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
