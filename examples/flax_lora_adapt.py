"""Pretrain a GRU with BPTT, then adapt it ONLINE through low-rank (LoRA) adapters only.

What is learned
---------------
1. Pretraining. A GRU (written with ``braintrace_flax.ETPDense`` layers) reads
   scikit-learn's 8x8 digits one row per step (``T = 8``) and classifies them from
   its last-step readout. It is trained with exact BPTT, as you would offline.
2. The shift. The deployed sensor is now wired mirror-wise: every row arrives
   left-right flipped. The pretrained network loses much of its accuracy.
3. Adaptation. Every layer of the same network is rebuilt as a
   ``braintrace_flax.ETPLoRA`` layer ``y = x @ W0 + (x @ A) @ B + b``: the pretrained
   kernel ``W0`` goes into the ``'frozen'`` variable collection, and only the
   adapters ``A (in, r)``, ``B (r, out)`` (plus the bias) are ``params``. ``B`` starts
   at zero, so the adapted network starts as exactly the pretrained one. The
   adapters are then trained ONLINE (``--algorithm d_rtrl`` or ``pp_prop``) on the
   mirrored digits: eligibility traces run forward with the sequence, so no time
   step is stored. The frozen base reaches the learner through
   ``braintrace_flax.compile(..., constants=variables)``: optax never sees it, and
   the script checks that it is bit-for-bit unchanged at the end.

Why a mirror: it permutes the 8 inputs of every step, so the exact fix for an input
kernel is ``W0 -> P W0`` with ``P`` the reversal. ``P - I`` has rank 4 (four swapped
pixel pairs), so a rank-4 adapter *can* represent it; the question is whether the
online gradient finds it. The loss is on the last step but the rows arrive at every
step, so most of the input kernels' credit flows through the recurrence: that is
what the eligibility traces carry (``--algorithm one_step``, the one-step gradient
with no traces, is the control). The README's examples table has the measured
accuracies before and after adaptation.

Because ``W0`` is never touched, dropping the adapters gives back the pretrained
network exactly; the adapted network itself is specialised to the mirrored sensor
(its accuracy on unmirrored digits, also printed, drops).

As in ``flax_gru_digits.py``, the loss lives on the last step only, so each
mini-batch of sequences gives one Adam update from ``learner.scan``'s summed
gradient. ``--compare`` also adapts a copy with BPTT as the reference.
The last stdout line is a JSON summary.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import _common as common
import braintrace as bt
import braintrace_flax as btf

NUM_CLASSES = common.DIGIT_CLASSES


# -- data ---------------------------------------------------------------------------------


def mirror(x: np.ndarray) -> np.ndarray:
    """The shifted task: every row arrives left-right flipped."""
    return x[:, :, ::-1].copy()


# -- the model ----------------------------------------------------------------------------


class AdaptableGRU(nn.Module):
    """One step of a GRU classifier whose every dense layer is either plain or LoRA.

    ``rank=0``: ``ETPDense`` layers (``kernel``, ``bias`` in ``params``) for pretraining.
    ``rank>0``: ``ETPLoRA`` layers with the same names, whose base kernel lives in the
    ``'frozen'`` collection, so the parameter paths of both versions line up.
    """

    hidden: int
    rank: int = 0

    def dense(self, features: int, name: str, use_bias: bool = True):
        if self.rank == 0:
            return btf.ETPDense(features, use_bias=use_bias, name=name)
        # The base initializer only shapes the 'frozen' slot; the pretrained kernel
        # is written into it afterwards (see adapter_variables).
        return btf.ETPLoRA(
            features, self.rank, use_bias=use_bias, base_kernel=nn.initializers.zeros, name=name
        )

    @nn.compact
    def __call__(self, h, x):
        n = self.hidden
        r = nn.sigmoid(self.dense(n, "ir")(x) + self.dense(n, "hr", use_bias=False)(h))
        z = nn.sigmoid(self.dense(n, "iz")(x) + self.dense(n, "hz", use_bias=False)(h))
        c = jnp.tanh(self.dense(n, "in")(x) + r * self.dense(n, "hn")(h))
        h = (1.0 - z) * c + z * h
        return h, self.dense(NUM_CLASSES, "readout")(h)


def adapter_variables(pretrained: dict, fresh: dict) -> dict:
    """Put pretrained weights into a freshly initialised LoRA model's variables.

    Each layer's ``kernel`` becomes the frozen ``base_kernel``; its ``bias`` seeds the
    adapter's (trainable) bias. ``lora_a`` keeps its random init, ``lora_b`` its zeros.
    """
    params = jax.tree_util.tree_map(lambda a: a, fresh["params"])  # a copy to fill in
    frozen = {}
    for layer, weights in pretrained.items():
        frozen[layer] = {"base_kernel": weights["kernel"]}
        if "bias" in weights:
            params[layer] = {**params[layer], "bias": weights["bias"]}
    return {"params": params, btf.FROZEN: frozen}


def low_rank_change(params: dict, frozen: dict) -> dict:
    """Per layer, ``|A @ B| / |W0|`` (Frobenius): how far the adapter moved the kernel.

    ETPLoRA's ``scale`` is left at 1, so the learned update is exactly ``A @ B``.
    """
    return {
        layer: float(
            jnp.linalg.norm(p["lora_a"] @ p["lora_b"])
            / jnp.linalg.norm(frozen[layer]["base_kernel"])
        )
        for layer, p in params.items()
    }


def count(tree) -> int:
    return sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(tree))


# -- training and evaluation --------------------------------------------------------------


def accuracy_fn(model, hidden, constants=None):
    """``accuracy(params, x, y)`` on ``(N, T, 8)`` images, read at the last step."""
    step = btf.make_step(model, constants=constants)

    @jax.jit
    def accuracy(params, x, y):
        xs = jnp.swapaxes(x, 0, 1)
        h0 = jnp.zeros((xs.shape[1], hidden), jnp.float32)
        _, logits = jax.lax.scan(lambda h, xt: step(params, h, xt), h0, xs)
        return jnp.mean(jnp.argmax(logits[-1], -1) == y)

    return accuracy


def fit(
    learner,
    params,
    train,
    test,
    accuracy,
    *,
    epochs,
    lr,
    batch_size,
    max_batches,
    seed,
    hidden,
    progress,
    label,
):
    """Adam on ``learner.scan``'s summed gradient, one update per mini-batch."""
    x_train, y_train = train
    total_updates = epochs * common.batches_per_epoch(len(x_train), batch_size, max_batches)
    opt = optax.adam(optax.cosine_decay_schedule(lr, total_updates))
    opt_state = opt.init(params)
    h0 = jnp.zeros((batch_size, hidden), jnp.float32)

    @jax.jit
    def update(params, opt_state, xs, targets):
        state = learner.init(params, h0, xs[0])  # new sequences: zero hidden and traces
        (losses, _), grads, _ = learner.scan(params, state, xs, targets)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.sum()

    history = {"loss": [], "eval_at": [0], "test_acc": [float(accuracy(params, *test))]}
    rng = np.random.default_rng(seed)
    progress.set_description(label)
    for epoch in range(1, epochs + 1):
        for idx in common.minibatches(len(x_train), batch_size, rng, max_batches):
            xs, targets = common.last_step_targets(x_train[idx], y_train[idx])
            params, opt_state, loss = update(params, opt_state, xs, targets)
            history["loss"].append(float(loss))
            progress.update()
        history["eval_at"].append(len(history["loss"]))
        history["test_acc"].append(float(accuracy(params, *test)))
        progress.set_postfix(epoch=epoch, test_acc=f"{history['test_acc'][-1]:.3f}")
    return params, history


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument(
        "--algorithm",
        choices=("d_rtrl", "pp_prop", "snap1", "rtrl", "uoro", "one_step"),
        default="d_rtrl",
        help="online algorithm for the adaptation (pretraining is always BPTT; "
        "one_step: the no-trace control)",
    )
    p.add_argument(
        "--compare", action="store_true", help="also adapt a copy with BPTT and plot both"
    )
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--hidden", type=int, default=64, help="GRU units")
    p.add_argument(
        "--pretrain-epochs", type=int, default=30, help="BPTT epochs on the original digits"
    )
    p.add_argument(
        "--adapt-epochs", type=int, default=15, help="online LoRA epochs on the mirrored digits"
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per update")
    p.add_argument("--lr", type=float, default=3e-3, help="pretraining Adam peak rate")
    p.add_argument("--adapt-lr", type=float, default=1e-2, help="adaptation Adam peak rate")
    p.add_argument("--decay", type=float, default=0.9, help="pp_prop's trace decay")
    p.add_argument("--max-batches", type=int, default=0, help="cap batches per epoch (0: all)")
    common.add_run_flags(
        p,
        quick_help="smoke run: tiny model, 2 epochs of 3 batches per phase",
        verbose_help="print the adapter's compile report",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.adapt_epochs, args.max_batches, args.hidden = 2, 2, 3, 16
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = common.load_digit_sequences(chunk=8)  # one row a step
    original = ((x_train, y_train), (x_test, y_test))
    shifted = ((mirror(x_train), y_train), (mirror(x_test), y_test))
    per_epoch = common.batches_per_epoch(len(x_train), args.batch_size, args.max_batches)
    runs = [args.algorithm] + (["bptt"] if args.compare else [])
    shared = dict(
        batch_size=args.batch_size, max_batches=args.max_batches, seed=args.seed, hidden=args.hidden
    )
    h0 = jnp.zeros((args.batch_size, args.hidden), jnp.float32)
    x0 = jnp.zeros((args.batch_size, 8), jnp.float32)
    total = (args.pretrain_epochs + len(runs) * args.adapt_epochs) * per_epoch

    with common.progress(total, quiet=args.quiet) as progress:
        # 1. Pretrain every weight with exact BPTT on the original digits.
        base_model = AdaptableGRU(args.hidden)
        base_params = base_model.init(jax.random.key(args.seed), h0, x0)["params"]
        base_acc = accuracy_fn(base_model, args.hidden)
        base_params, pre_hist = fit(
            btf.compile(base_model, common.last_step_cross_entropy, bt.BPTT()),
            base_params,
            *original,
            base_acc,
            epochs=args.pretrain_epochs,
            lr=args.lr,
            progress=progress,
            label="pretrain (bptt)",
            **shared,
        )

        # 2. Rebuild the network with LoRA layers around the pretrained (frozen) kernels.
        lora_model = AdaptableGRU(args.hidden, rank=args.rank)
        fresh = lora_model.init(jax.random.key(args.seed + 1), h0, x0)
        variables = adapter_variables(base_params, fresh)
        lora_acc = accuracy_fn(lora_model, args.hidden, constants=variables)
        before = {
            "original": float(base_acc(base_params, *original[1])),
            "shifted": float(base_acc(base_params, *shifted[1])),
        }
        # lora_b = 0: the adapted model starts as the pretrained one (same logits).
        x_probe = jnp.asarray(x_test[:, 0])
        np.testing.assert_allclose(
            lora_model.apply(variables, h0[:1], x_probe[:1])[1],
            base_model.apply({"params": base_params}, h0[:1], x_probe[:1])[1],
            atol=1e-5,
        )

        # 3. Adapt only the LoRA params online on the mirrored digits.
        curves, adapted, seconds = {"pretrain (bptt, original)": pre_hist}, {}, {}
        for name in runs:
            algorithm = bt.algorithm_by_name(name, decay_or_rank=args.decay)
            learner = btf.compile(
                lora_model, common.last_step_cross_entropy, algorithm, constants=variables
            )
            if args.verbose and name != "bptt":
                tqdm.write(str(learner.report(variables["params"], h0, x0)))
            t0 = time.perf_counter()
            adapted[name], curves[f"adapt {name} (mirrored)"] = fit(
                learner,
                variables["params"],
                *shifted,
                lora_acc,
                epochs=args.adapt_epochs,
                lr=args.adapt_lr,
                progress=progress,
                label=f"adapt ({name})",
                **shared,
            )
            seconds[name] = round(time.perf_counter() - t0, 1)

    # The base never moved: it is not in params, so no gradient or update reaches it.
    # The adapted network still runs on exactly the pretrained kernels...
    base_diff = max(
        float(jnp.max(jnp.abs(variables[btf.FROZEN][layer]["base_kernel"] - w["kernel"])))
        for layer, w in base_params.items()
    )
    assert base_diff == 0.0, base_diff
    assert "base_kernel" not in str(jax.tree_util.tree_structure(adapted[args.algorithm]))
    # ...and what it learned sits in the low-rank updates A @ B.
    change = low_rank_change(adapted[args.algorithm], variables[btf.FROZEN])

    after = {
        name: {
            "shifted": float(lora_acc(p, *shifted[1])),
            "original": float(lora_acc(p, *original[1])),
        }
        for name, p in adapted.items()
    }
    png = common.plot_path(args, f"flax_lora_adapt_{'_vs_'.join(runs)}")
    common.plot_training(
        curves,
        png,
        f"LoRA (rank {args.rank}) adaptation of a BPTT-pretrained GRU to mirrored digits",
        chance=1 / NUM_CLASSES,
        loss_label="last-step cross-entropy",
    )

    print(
        f"trainable parameters: pretraining {count(base_params)}, "
        f"adaptation {count(variables['params'])} (LoRA rank {args.rank} + biases)"
    )
    print(f"frozen base kernels: max |base - pretrained| = {base_diff} (untouched)")
    print(
        "low-rank update |A @ B| / |W0| per layer after adaptation: "
        + ", ".join(f"{k} {v:.2f}" for k, v in change.items())
    )
    print(
        f"before adaptation: original test acc {before['original']:.3f}, "
        f"mirrored {before['shifted']:.3f}"
    )
    for name, acc in after.items():
        print(
            f"after {name:7s} adaptation: mirrored test acc {acc['shifted']:.3f} "
            f"(original {acc['original']:.3f}) in {seconds[name]:.1f} s"
        )
    print(f"plot: {png}" if png else "plot: none (--no-plot)")
    summary = {
        "example": "flax_lora_adapt",
        "algorithm": args.algorithm,
        "test_accuracy": round(after[args.algorithm]["shifted"], 4),
        "test_accuracy_before": round(before["shifted"], 4),
        "pretrained_test_accuracy": round(before["original"], 4),
        "original_task_accuracy_after": round(after[args.algorithm]["original"], 4),
        "base_max_abs_diff": base_diff,
        "chance": 1 / NUM_CLASSES,
        "rank": args.rank,
        "hidden": args.hidden,
        "pretrain_epochs": args.pretrain_epochs,
        "adapt_epochs": args.adapt_epochs,
        "adapt_seconds": seconds[args.algorithm],
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "plot": str(png) if png else None,
    }
    if "bptt" in after:
        summary["bptt_test_accuracy"] = round(after["bptt"]["shifted"], 4)
    return common.print_summary(summary)


if __name__ == "__main__":
    main()
