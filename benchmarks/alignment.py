"""Alignment of the online gradients with BPTT on the approximate class, per window.

For a tanh RNN with a recurrent ETP weight, a GRU built from ETP dense ops and a
recurrent LIF network (T=50, B=8, n=32 by default, fixed seeds), prints the cosine
similarity, sign agreement and norm ratio of each algorithm's summed gradient
against BPTT's (float64), for windows of k = 1, 4 and 16 steps
(``learner.scan(..., window=k)``; k = 1 is the per-step learner):

- ``rtrl``: the full influence matrix, exact at every k (the check that the table
  measures what it says: its cosine is 1);
- ``snap1``, ``d_rtrl`` and ``pp_prop(0.9)``: exact inside a window, traces across
  its entry (SnAp-1 also carries each unit's own recurrent weight);
- ``uoro``: one key stream, an unbiased but noisy estimate;
- ``tbptt``: ``OneStep`` windows, i.e. truncated BPTT over k steps with no traces:
  the control that shows what the traces add at the same window.

Figures are joint over all leaves but the readout ``ro`` (which every algorithm gets
exactly); ``--per-leaf`` adds the per-leaf breakdown. With ``--seeds N`` every figure
is the mean over N parameter seeds (and the table shows the spread of the cosine);
``--self-gain g`` adds ``g`` times the identity to the recurrent weights and
``--recurrent-scale s`` scales their random part (a diagonal-heavy initialisation,
where SnAp-1's diagonal matters). The last stdout line
is a JSON object keyed ``"<model>/<algorithm>/k=<k>"``, so runs can be compared. The
default run takes a few minutes on 2 CPU cores.

    python benchmarks/alignment.py                     # the README table
    python benchmarks/alignment.py --seeds 5 --windows 1 --algorithms snap1 d_rtrl
    python benchmarks/alignment.py --self-gain 0.9 --recurrent-scale 0.3 --seeds 5 --windows 1
    python benchmarks/alignment.py --T 200 --per-leaf
    python benchmarks/alignment.py --model convlstm     # a stock nn.ConvLSTMCell, ETP convs

``--model convlstm`` (not in the default run) runs a stock ``flax.linen.ConvLSTMCell``
through ETP convolutions (``braintrace_flax.etp_dense_calls``) on ``5 x 5`` images with
``n_in`` channels and ``n // 8`` feature maps.
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


#: The recurrent weight of each model (``--self-gain`` adds to its diagonal).
RECURRENT = {"rnn": ("wh",), "gru": ("whr", "whz", "whn"), "rlif": ("wr",)}

#: Algorithms a model's ops cannot run (SnAp-1 needs an op's own recurrent entry).
UNSUPPORTED: dict = {}


def convlstm_problem(args, seed: int = 0):
    """A stock ``flax.linen.ConvLSTMCell`` run through ETP convs (``convert_dense``).

    ``(5, 5)`` images with ``n_in`` channels, ``n // 8`` feature maps, a plain readout.
    """
    import flax.linen as nn  # only this model needs Flax

    import braintrace_flax as btf

    cell = nn.ConvLSTMCell(max(args.n // 8, 1), (3, 3), param_dtype=jnp.float64)
    k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
    xs = jax.random.normal(k1, (args.T, args.B, 5, 5, args.n_in))
    targets = jax.random.normal(k2, (args.T, args.B, 2))
    carry = cell.initialize_carry(jax.random.key(0), xs[0].shape)
    n_out = 5 * 5 * cell.features
    params = {
        "cell": cell.init(jax.random.key(seed), carry, xs[0])["params"],
        "ro": jax.random.normal(jax.random.PRNGKey(100 + seed), (n_out, 2)) / n_out**0.5,
    }

    def step(p, carry, x):
        with btf.etp_dense_calls():  # the stock convs run through the ETP conv op
            carry, h = cell.apply({"params": p["cell"]}, carry, x)
        return carry, jnp.tanh(h.reshape(h.shape[0], -1)) @ p["ro"]

    return step, params, carry, xs, targets


def algorithms(pp_decay: float) -> dict:
    """The algorithms compared, by the label the table and the JSON use."""
    return {
        "rtrl": bt.RTRL(),
        "snap1": bt.SnAp1(),
        "d_rtrl": bt.D_RTRL(),
        f"pp_prop({pp_decay:g})": bt.pp_prop(pp_decay),
        "uoro": bt.UORO(),
        "tbptt": bt.OneStep(),
    }


def problem(model: str, args, seed: int = 0):
    """``(step, params, hidden, xs, targets)`` for one model and parameter seed."""
    if model == "convlstm":
        return convlstm_problem(args, seed)
    step, make_params, names = MODELS[model]
    params = make_params(seed, args.n_in, args.n)
    for name in RECURRENT[model]:
        params[name] = args.recurrent_scale * params[name] + args.self_gain * jnp.eye(args.n)
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


def _cell(stats: dict, spread: float | None = None) -> str:
    cos = f"{stats['cosine']:.4f}" + (f"+-{spread:.3f}" if spread is not None else "")
    return f"{cos:>16}{stats['sign']:>7.3f}{stats['norm_ratio']:>7.3f}"


def _mean(figures: list) -> dict:
    return {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}


def _measure(model, algo, k, args, references) -> tuple:
    """``(joint figures averaged over seeds, cosine spread, per-leaf figures of seed 0)``."""
    joints, leaves = [], None
    for seed, reference in enumerate(references):
        step, params, hidden, xs, targets = problem(model, args, seed)
        grads = windowed_grads(step, algo, params, hidden, xs, targets, k)
        joints.append(alignment(grads, reference, skip=SKIP))
        if leaves is None:
            leaves = {
                leaf: alignment({leaf: grads[leaf]}, {leaf: reference[leaf]})
                for leaf in sorted(params)
                if leaf not in SKIP
            }
    cosines = [j["cosine"] for j in joints]
    spread = float(jnp.std(jnp.array(cosines))) if len(cosines) > 1 else None
    return _mean(joints), spread, leaves


def measure_model(model: str, args) -> dict:
    """Print one model's table and return its joint figures by ``"<algo>/k=<k>"``."""
    references = []
    for seed in range(args.seeds):
        step, params, hidden, xs, targets = problem(model, args, seed)
        references.append(bptt_grad(step, M.mse, params, hidden, xs, targets, True))
    print(
        f"\n== {model} (T={args.T}, B={args.B}, n={args.n}, seeds={args.seeds}, "
        f"self-gain={args.self_gain:g}, recurrent-scale={args.recurrent_scale:g}): "
        "cosine / sign / norm ratio =="
    )
    print(f"{'algorithm':<14}" + "".join(f"{f'k={k}':>30}" for k in args.windows))
    figures = {}
    chosen = {
        k: v
        for k, v in algorithms(args.pp_decay).items()
        if k.split("(")[0] in args.algorithms and k.split("(")[0] not in UNSUPPORTED.get(model, ())
    }
    for label, algo in chosen.items():
        cells, leaves = [], []
        for k in args.windows:
            joint, spread, per_leaf = _measure(model, algo, k, args, references)
            figures[f"{label}/k={k}"] = {name: round(v, 4) for name, v in joint.items()}
            if spread is not None:
                figures[f"{label}/k={k}"]["cosine_std"] = round(spread, 4)
            cells.append(_cell(joint, spread))
            leaves.append(per_leaf)
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
    parser.add_argument(
        "--models",
        "--model",
        nargs="+",
        choices=sorted(MODELS) + ["convlstm"],
        default=list(MODELS),
        help="models to measure (convlstm: a stock nn.ConvLSTMCell through ETP convs)",
    )
    parser.add_argument("--per-leaf", action="store_true", help="also print every leaf")
    parser.add_argument("--seeds", type=int, default=1, help="parameter seeds to average")
    parser.add_argument(
        "--self-gain", type=float, default=0.0, help="added to the recurrent weights' diagonal"
    )
    parser.add_argument(
        "--recurrent-scale", type=float, default=1.0, help="scales the random recurrent weights"
    )
    names = ["rtrl", "snap1", "d_rtrl", "pp_prop", "uoro", "tbptt"]
    parser.add_argument(
        "--algorithms", nargs="+", choices=names, default=names, help="the rows to measure"
    )
    args = parser.parse_args()

    summary = {
        "config": {
            "T": args.T,
            "B": args.B,
            "n": args.n,
            "n_in": args.n_in,
            "seed": args.seed,
            "seeds": args.seeds,
            "self_gain": args.self_gain,
            "recurrent_scale": args.recurrent_scale,
            "skip": list(SKIP),
        }
    }
    for model in args.models:
        for key, figures in measure_model(model, args).items():
            summary[f"{model}/{key}"] = figures
    print(
        "\nJoint over all leaves but the readout 'ro' (exact for every algorithm). "
        "tbptt = OneStep windows: truncated BPTT over k steps, no traces; uoro: one key."
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
