"""Alignment of the online gradients with BPTT on the approximate class.

For a tanh RNN with a recurrent ETP weight, a GRU built from ETP dense ops and a
recurrent LIF network (T=50, B=8, n=32 by default, fixed seeds), prints per leaf
and jointly: cosine similarity, sign agreement and norm ratio of D-RTRL's and
pp_prop's summed gradient against BPTT's (float64). The last stdout line is a JSON
object with the joint figures, so runs can be compared.

    python benchmarks/alignment.py            # the table the tests' floors come from
    python benchmarks/alignment.py --T 200    # longer sequences
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import braintrace as bt  # noqa: E402
import models as M  # noqa: E402
from oracles import alignment, bptt_grad  # noqa: E402

MODELS = {
    "rnn": (M.rnn_step, M.rnn_params, None),
    "gru": (M.gru_step, M.gru_params, None),
    "rlif": (M.rlif_step, M.rlif_params, ("i", "v")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=50, help="sequence length")
    parser.add_argument("--B", type=int, default=8, help="batch size")
    parser.add_argument("--n", type=int, default=32, help="hidden units")
    parser.add_argument("--n-in", type=int, default=8, help="input features")
    parser.add_argument("--seed", type=int, default=3, help="data seed")
    args = parser.parse_args()

    algorithms = {"d_rtrl": bt.D_RTRL(), "pp_prop(0.9)": bt.pp_prop(0.9),
                  "pp_prop(0.5)": bt.pp_prop(0.5)}
    summary = {}
    for model, (step, make_params, names) in MODELS.items():
        params = make_params(0, args.n_in, args.n)
        shape = (args.B, args.n)
        hidden = {k: jnp.zeros(shape) for k in names} if names else jnp.zeros(shape)
        k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
        xs = jax.random.normal(k1, (args.T, args.B, args.n_in))
        targets = jax.random.normal(k2, (args.T, args.B, 2))
        reference = bptt_grad(step, M.mse, params, hidden, xs, targets, True)
        print(f"\n== {model} (T={args.T}, B={args.B}, n={args.n}) ==")
        print(f"{'algorithm':<14}{'leaf':<8}{'cosine':>9}{'sign':>8}{'norm':>8}")
        for label, algo in algorithms.items():
            learner = bt.compile(step, M.mse, algo, batched=True)
            state = learner.init(params, hidden, xs[0])
            _, grads, _ = jax.jit(learner.scan)(params, state, xs, targets)
            for leaf in sorted(params):
                s = alignment({leaf: grads[leaf]}, {leaf: reference[leaf]})
                print(f"{label:<14}{leaf:<8}{s['cosine']:>9.4f}{s['sign']:>8.3f}"
                      f"{s['norm_ratio']:>8.3f}")
            joint = alignment(grads, reference, skip=("ro",))
            print(f"{label:<14}{'joint*':<8}{joint['cosine']:>9.4f}{joint['sign']:>8.3f}"
                  f"{joint['norm_ratio']:>8.3f}")
            summary[f"{model}/{label}"] = {k: round(v, 4) for k, v in joint.items()}
    print("\n* joint: all leaves but the readout 'ro' (exact for every algorithm).")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
