"""Credit across a long distractor stream: eligibility traces against truncated BPTT.

The task
--------
Each trial is ``T = cue + distance`` steps (default 10 + 150). For the first ``--cue``
steps a cue line holds the trial's label as ``+1`` or ``-1``; then the cue line goes
silent and ``--distractors`` other lines (default 48) carry fresh Gaussian noise at
every step until the end. Only the LAST step is scored: the network must say which
cue it saw ``--distance`` steps earlier (chance 50%). Every update draws a fresh
batch of trials (the same batches for every method); the test trials are held out.

The network
-----------
One leaky layer, ``h_t = a * h_{t-1} + (1 - a) * tanh(W x_t + b)``: an ETP dense input
layer (``ops.dense``), per-neuron decays ``a = sigmoid(d)`` trained through
``ops.elemwise`` (time constants start spread over 10-200 steps), and a plain
``jnp`` readout of ``h`` into two logits. The hidden neurons are driven by external
input only, so the model is in braintrace's *exact class*: D-RTRL's gradient equals
BPTT's, per step or per window (the compile report, ``--verbose``, says so).

The four methods (``learner.scan``, one Adam update per batch of trials)
------------------------------------------------------------------------
- ``tbptt``         ``OneStep`` windows of ``--window`` steps: truncated BPTT (TBPTT-k);
- ``d_rtrl``        D-RTRL per step (``window=None``);
- ``d_rtrl_window`` D-RTRL in windows of ``--window`` steps: exact inside a window,
                    eligibility traces carry the credit across its entry;
- ``bptt``          full BPTT over the trial (the exact reference; memory O(T)).

Why traces win here, and truncation cannot
------------------------------------------
The loss sits on the last step and the cue ends ``distance >= 10 x window`` steps
before it, so no window of TBPTT holds both a loss and a cue input: its gradient for
the cue weights ``W[cue]`` is exactly zero and they keep their random initial values.
D-RTRL's trace of ``W[cue]`` is advanced every step through the layer's own memory
``D = a`` (the leaky membrane), so the credit for the cue arrives at the answer
however long ago the cue was, as long as the membranes remember: that is why the
time constants start long and are trainable. With the
exact class this credit is BPTT's, so ``d_rtrl``, ``d_rtrl_window`` and ``bptt`` follow
the same learning curve (they differ by float32 rounding only), while the cost
differs: the online methods' memory is flat in the distance (the JSON reports the
compiled temp memory of one update, ``learner.scan`` plus Adam, at the training
distance and at ``--memory-factor`` times it), BPTT's grows with it.

What truncation can still learn is a readout of whatever the random initial weights
happen to store about the cue, plus the time constants (their credit reaches the
window's entry state). The distractors are what keep that route closed: they share
the leaky layer with the cue and span more dimensions (48) than the layer has neurons
(32), so no readout can cancel them; with fewer noise lines than neurons a trained
readout alone decodes the cue and truncation catches up (try ``--distractors 4``).
The cue lasts ten steps rather than one so that the exact methods get a strong
first gradient and learn within the time budget. Measured numbers are in the
README's examples table.

Run
---
``python examples/long_range.py``                 (all four methods; minutes at most on 2 cores)
``python examples/long_range.py --distance 300``  (further: truncation stays at chance)
``python examples/long_range.py --quick``         (a seconds-long smoke run)

The plot (loss, test accuracy, temp memory against the distance) goes to ``--plot``
(default ``examples/out/long_range.png``, ``long_range_quick.png`` for ``--quick``;
none with ``--no-plot``); the last stdout line is a JSON summary
``{"example": "long_range", "rows": {name: {"test_accuracy", "seconds", "temp_MiB",
...}}, ...}``.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import optax

import _common as common
import braintrace as bt
from braintrace import ops

CHANCE = 0.5
METHODS = ("tbptt", "d_rtrl", "d_rtrl_window", "bptt")


def method(name: str, window: int) -> tuple[bt.Algorithm, int | None]:
    """``(algorithm, window)`` for ``learner.scan`` under a method's row name."""
    return {
        "tbptt": (bt.OneStep(), window),
        "d_rtrl": (bt.D_RTRL(), None),
        "d_rtrl_window": (bt.D_RTRL(), window),
        "bptt": (bt.BPTT(), None),
    }[name]


# -- task ---------------------------------------------------------------------------------


def make_trials(key, n: int, args, distance: int | None = None):
    """``n`` trials: time-major inputs ``(T, n, 1 + distractors)`` and labels ``(n,)``.

    Line 0 holds the cue (``2 * label - 1``) for the first ``args.cue`` steps; the other
    lines are standard Gaussian noise after the cue and zero during it. ``distance``
    (default ``args.distance``): steps from the cue's end to the answer.
    """
    k_label, k_noise = jax.random.split(key)
    T = args.cue + (args.distance if distance is None else distance)
    labels = jax.random.bernoulli(k_label, 0.5, (n,)).astype(jnp.int32)
    during_cue = (jnp.arange(T) < args.cue)[:, None, None]
    cue = jnp.where(during_cue, (2.0 * labels - 1.0)[None, :, None], 0.0)
    noise = jax.random.normal(k_noise, (T, n, args.distractors))
    return jnp.concatenate([cue, jnp.where(during_cue, 0.0, noise)], -1), labels


def last_step_targets(labels, T: int):
    """Per-step targets: the label everywhere, weight 1 on the last step only."""
    weight = jnp.zeros((T, labels.shape[0])).at[-1].set(1.0)
    return {"label": jnp.broadcast_to(labels, (T, labels.shape[0])), "weight": weight}


def make_trials_and_targets(key, args, distance: int):
    """One training batch at ``distance``: ``(inputs, targets)`` for ``learner.scan``.

    Built outside the update, so that the update's temp memory holds nothing of
    length ``T`` that the learner itself does not keep.
    """
    x, labels = make_trials(key, args.batch_size, args, distance)
    return x, last_step_targets(labels, x.shape[0])


def cross_entropy(logits, target):
    """Loss of ONE sample at one step (zero before the last step)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target["label"])
    return target["weight"] * ce


# -- model --------------------------------------------------------------------------------


def leaky_step(p, h, x):
    """One step of the leaky layer: ``(new_h, logits)`` (works batched and unbatched)."""
    a = ops.elemwise(p["decay"], jax.nn.sigmoid)  # trainable per-neuron memory
    h = a * h + (1.0 - a) * jnp.tanh(ops.dense(x, p["w"], p["b"]))
    return h, h @ p["readout"] + p["readout_bias"]  # plain jnp: exact one-step gradient


def init_params(key, n_in: int, n: int) -> dict:
    k_w, k_out = jax.random.split(key)
    a = jnp.linspace(0.9, 0.995, n)  # time constants -1/log(a): about 10 to 200 steps
    return {
        "w": jax.random.normal(k_w, (n_in, n)) / jnp.sqrt(n_in),
        "b": jnp.zeros(n),
        "decay": jnp.log(a / (1.0 - a)),
        "readout": jax.random.normal(k_out, (n, 2)) / jnp.sqrt(n),
        "readout_bias": jnp.zeros(2),
    }


@jax.jit
def evaluate(params, x, labels):
    """Accuracy of the last step's answer, running the plain model (no learner)."""
    h0 = jnp.zeros((x.shape[1], params["b"].shape[0]))
    _, logits = jax.lax.scan(lambda h, x_t: leaky_step(params, h, x_t), h0, x)
    return jnp.mean(jnp.argmax(logits[-1], -1) == labels)


# -- training -----------------------------------------------------------------------------


def temp_mib(compiled) -> float:
    """Compiled temp memory in MiB (activations and scratch; not arguments or outputs)."""
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def memory_distances(args) -> tuple[int, int]:
    """The distances at which the temp memory is read: the trained one and a longer one."""
    return args.distance, args.memory_factor * args.distance


def train(name: str, sample, test_set, args, progress) -> dict:
    """Train a fresh model (same init, same batches for every method); its history."""
    algorithm, window = method(name, args.window)
    k_init, k_data, _ = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    n_in = 1 + args.distractors
    params = init_params(k_init, n_in, args.hidden)
    learner = bt.compile(leaky_step, cross_entropy, algorithm, batched=True)
    h0, x0 = jnp.zeros((args.batch_size, args.hidden)), jnp.zeros((args.batch_size, n_in))
    if args.verbose and name == args.methods[0]:  # how each parameter is trained, how exactly
        print(
            bt.compile(leaky_step, cross_entropy, bt.D_RTRL(), batched=True).report(params, h0, x0)
        )
    state0 = learner.init(params, h0, x0)  # fresh neurons and zero traces: every trial
    optimizer = optax.adam(args.lr)

    def update(params, opt_state, x, targets):
        (losses, _), grads, _ = learner.scan(params, state0, x, targets, window=window)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.sum()

    # Compile before the clock starts; read the temp memory of one update (learner.scan
    # and Adam) at the trained distance and, from shapes alone, at a longer one.
    opt_state = optimizer.init(params)
    batch = sample(jax.random.fold_in(k_data, 0))  # also warms up fold_in and sample
    update = jax.jit(update)
    near, far = memory_distances(args)
    far_batch = jax.eval_shape(lambda key: make_trials_and_targets(key, args, far), k_data)
    memory = {far: temp_mib(update.lower(params, opt_state, *far_batch).compile())}
    update = update.lower(params, opt_state, *batch).compile()
    memory = {near: temp_mib(update), **memory}

    history = {"loss": [], "eval_at": [], "test_acc": [], "memory_MiB": memory}
    start = time.perf_counter()
    for it in range(1, args.iterations + 1):
        params, opt_state, loss = update(params, opt_state, *sample(jax.random.fold_in(k_data, it)))
        history["loss"].append(float(loss))
        if it % args.eval_every == 0 or it == args.iterations:
            history["eval_at"].append(it)
            history["test_acc"].append(float(evaluate(params, *test_set)))
            progress.set_postfix(method=name, test=f"{history['test_acc'][-1]:.3f}")
        progress.update()
    history["seconds"] = round(time.perf_counter() - start, 3)
    return history


# -- plot and summary ---------------------------------------------------------------------


def plot_memory(histories: dict, args):
    """The third panel: compiled temp memory of one update against the distance."""

    def draw(ax):
        for name, h in histories.items():
            distances = sorted(h["memory_MiB"])
            ax.plot(distances, [h["memory_MiB"][d] for d in distances], "o-", label=name)
        ax.set(
            xticks=memory_distances(args),
            yscale="log",
            xlabel="cue-to-answer distance (steps)",
            ylabel="temp memory (MiB)",
            title="temp memory of one update",
        )

    return draw


def summarize(histories: dict, args, plot_path, total_seconds: float) -> dict:
    rows = {
        name: {
            "test_accuracy": round(h["test_acc"][-1], 4),
            "seconds": h["seconds"],
            "temp_MiB": round(h["memory_MiB"][args.distance], 3),
            "temp_MiB_by_distance": {str(d): round(m, 3) for d, m in h["memory_MiB"].items()},
        }
        for name, h in histories.items()
    }
    return {
        "example": "long_range",
        "rows": rows,
        "window": args.window,
        "distance": args.distance,
        "cue_steps": args.cue,
        "distractors": args.distractors,
        "hidden": args.hidden,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "chance": CHANCE,
        "seed": args.seed,
        "total_seconds": round(total_seconds, 1),
        "plot": str(plot_path) if plot_path else None,
    }


# -- command line -------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to train"
    )
    p.add_argument("--window", type=int, default=10, help="TBPTT / D-RTRL window (steps)")
    p.add_argument("--distance", type=int, default=150, help="steps from cue end to answer")
    p.add_argument("--cue", type=int, default=10, help="cue steps")
    p.add_argument("--distractors", type=int, default=48, help="noise lines")
    p.add_argument("--hidden", type=int, default=32, help="leaky neurons")
    p.add_argument("--iterations", type=int, default=600, help="Adam updates per method")
    p.add_argument("--batch-size", type=int, default=64, help="fresh trials per update")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--test-trials", type=int, default=2048, help="held-out trials to score")
    p.add_argument("--eval-every", type=int, default=50, help="updates between test evals")
    p.add_argument(
        "--memory-factor", type=int, default=10, help="also read memory at this x distance"
    )
    p.add_argument(
        "--plot",
        type=pathlib.Path,
        default=None,
        help="PNG path (default: OUT/long_range.png; OUT/long_range_quick.png with --quick)",
    )
    common.add_run_flags(
        p, quick_help="tiny run for smoke tests (seconds)", verbose_help="print the compile report"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.window, args.distance, args.cue, args.distractors, args.hidden = 4, 40, 4, 8, 8
        args.iterations, args.batch_size, args.test_trials, args.eval_every = 20, 16, 256, 10
    if min(args.window, args.distance, args.cue) < 1 or args.memory_factor < 2:
        p.error("--window, --distance and --cue must be positive, --memory-factor at least 2")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    sample = jax.jit(lambda key: make_trials_and_targets(key, args, args.distance))
    test_set = make_trials(
        jax.random.split(jax.random.PRNGKey(args.seed), 3)[2], args.test_trials, args
    )
    # Compile the evaluation here, outside every method's clock.
    evaluate(init_params(jax.random.PRNGKey(0), 1 + args.distractors, args.hidden), *test_set)
    histories = {}
    total = len(args.methods) * args.iterations
    with common.progress(total, unit="update", quiet=args.quiet) as progress:
        for name in args.methods:
            histories[name] = train(name, sample, test_set, args, progress)

    plot_path = None if args.no_plot else args.plot or common.plot_path(args, "long_range")
    title = (
        f"cue recall across {args.distance} distractor steps (window {args.window}, "
        f"{args.hidden} leaky neurons, {args.distractors} noise lines; chance {CHANCE:.0%})"
    )
    exact = [name for name in args.methods if name != "tbptt"]
    if len(exact) > 1:
        title += f"\n{', '.join(exact)} compute the same gradient: their curves coincide"
    common.plot_training(
        histories,
        plot_path,
        title,
        chance=CHANCE,
        log_loss=False,
        loss_label="cross-entropy at the answer",
        extra=plot_memory(histories, args),
    )
    far = args.memory_factor * args.distance
    print(f"{'method':<15}{'test acc':>9}{'seconds':>9}{'temp MiB':>10}{f'at {far}':>10}")
    for name, h in histories.items():
        print(
            f"{name:<15}{h['test_acc'][-1]:>9.3f}{h['seconds']:>9.1f}"
            f"{h['memory_MiB'][args.distance]:>10.2f}{h['memory_MiB'][far]:>10.2f}"
        )
    print(f"chance {CHANCE:.3f}; plot: {plot_path or 'none (--no-plot)'}")
    return common.print_summary(summarize(histories, args, plot_path, time.perf_counter() - start))


if __name__ == "__main__":
    main()
