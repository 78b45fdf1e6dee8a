"""A spiking network in Equinox learns evidence accumulation online.

The task
--------
Each trial is ``T = cue + delay + decision`` time steps (default 50 + 10 + 10 = 70).
During the *cue* period two channels of ``--lines`` input neurons each (default 10)
emit Poisson spikes; one channel fires a little faster than the other (rates
``r (1 +- d)`` with ``d`` drawn per trial from ``[0.05, 0.5]``). Then the input goes
silent for the *delay*, and a "go" line switches on for the *decision* window: the
network must answer, with spikes, which channel fired more. Chance level is 50%.

Single cue spikes are weak evidence, so the answer needs the spike counts summed over
the whole cue period and then *held* through the delay: a memory of 20-70 steps. A
memory-less network is at chance (the decision window has no cue input at all). The
printed *ideal observer* (compare the two channels' total spike counts, which is the
Bayes-optimal decision here) is the accuracy ceiling for these trials.

The network
-----------
One layer of ``braintrace_eqx.LIFCell`` neurons (current-based leaky
integrate-and-fire, surrogate-gradient spikes) reads the 2 x 10 cue lines and the go
line through a ``braintrace_eqx.Linear``; its membrane decays ``a = sigmoid(w)`` are
trainable per neuron through a ``braintrace_eqx.Elemwise`` (time constant
``tau = -1 / log(a)`` steps). A plain ``eqx.nn.Linear`` reads the *spikes* out into
two logits at every step; the answer is the class with the larger logit summed over
the decision window. Memory lives in the slow membranes: a neuron with ``a ~ 0.95``
integrates the cue difference and keeps it through the delay, and the go input then
pushes the neurons holding enough evidence over threshold.

Why a feed-forward LIF layer, not a recurrent one: the hidden neurons are driven by
external input only, so the network lies in braintrace's *exact class*. There
D-RTRL's eligibility traces give exactly the BPTT gradient (``sum_t G_t`` equals
``jax.grad`` through the sequence), which the ``--compare`` run shows as two
coinciding curves (they separate only by float32 rounding, which the spike threshold
slowly amplifies). Recurrent weights would make D-RTRL an approximation (it drops
the path through ``W_rec``); slow trainable time constants give this task all the
memory it needs without them. The compile report (``--verbose``) confirms it: the
input weights, bias and decays are ``trace``-trained, the readout gets its exact
one-step gradient.

What online learning means here
-------------------------------
``braintrace_eqx.compile(model, loss, algorithm, batched=True)`` turns the per-sample
model into a learner. ``learner.scan`` walks a trial forward in time; at every step
it updates each trainable weight's *eligibility trace* (a running summary of how the
neuron state depends on that weight) and returns the step's gradient as the loss
signal contracted with the trace. Nothing is stored per time step, so memory is O(1)
in ``T``:

- ``--algorithm d_rtrl``  weight-sized traces; exact for this network;
- ``--algorithm pp_prop`` traces factorised into an input-side and an output-side
  part (memory ``I + O S`` instead of ``I O S`` per sample, ``S = 2`` states per
  neuron), with one global decay ``--pp-decay``: cheaper, approximate;
- ``--algorithm bptt``    the reference: backprop through the stored trial;
- ``--algorithm one_step`` the control: each step's own gradient, no traces.

Why one Adam update per trial batch (from ``scan``'s summed gradient) and not one
per time step: the loss exists only in the decision window, so 60 of the 70 per-step
gradients are exactly zero (the traces still advance, and carry the cue's credit to
the decision); updating mid-trial would only let Adam's momentum move the weights
while the evidence is still coming in. Summing the per-step gradients over the trial
also makes D-RTRL's update *identical* to BPTT's here. For a task with a loss at every
step, call ``learner.step`` and update every step instead (the README's quickstart).

What to expect
--------------
In the exact class, D-RTRL and BPTT reach the same accuracy; D-RTRL costs more time
per update on a CPU (it updates a ``batch x 21 x 64 x 2`` trace every step) but its
memory does not grow with ``T``. The README's examples table has the measured
accuracies and times of every algorithm against the printed ideal observer.

pp_prop falls clearly short on this task, whatever its ``--pp-decay``. Its trace for
``W[k, i]`` is the *product* of an input filter with one global decay and an output
filter, while the true trace filters input ``i`` through neuron ``k``'s own synapse
*and* membrane. Here the credit a cue spike earns at the decision is how much of it
neuron ``k``'s membrane still holds 20-70 steps later, which differs from neuron to
neuron; the factorised trace gives every neuron the same input-side memory, so it
mis-assigns that credit. The JSON summary reports how far each algorithm's gradient
is from BPTT's on the initial model (``grad_cosine_vs_bptt_at_init``, per leaf; the
decays' trace pp_prop keeps exact), and the final spike rate and median time
constant, which show pp_prop drifting to a noisier solution.

Run
---
``python examples/eqx_lif_snn.py``                 (D-RTRL)
``python examples/eqx_lif_snn.py --compare``        (also BPTT, on the same plot)
``python examples/eqx_lif_snn.py --algorithm pp_prop --compare``
``python examples/eqx_lif_snn.py --quick``          (seconds-long smoke run)

The plot (loss, test accuracy, learned time constants) goes to ``--out``; the last
stdout line is a JSON summary.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import _common as common
import braintrace as bt
import braintrace_eqx as bte

ALGORITHMS = bt.ALGORITHM_NAMES
CHANCE = 0.5


# -- data ---------------------------------------------------------------------------------


def make_trials(n: int, args, rng: np.random.Generator):
    """``n`` evidence-accumulation trials: time-major inputs ``(T, n, 2 lines + 1)``
    (float32 spikes, last line = go cue) and labels ``(n,)`` (1: channel A fired more)."""
    T = args.cue + args.delay + args.decision
    labels = rng.integers(0, 2, n)
    d = rng.uniform(0.05, 0.5, n)  # per-trial difficulty: relative rate difference
    hi, lo = args.rate * (1 + d), args.rate * (1 - d)
    rates = np.stack([np.where(labels == 1, hi, lo), np.where(labels == 1, lo, hi)], -1)
    cue = rng.random((args.cue, n, 2, args.lines)) < rates[None, :, :, None]
    x = np.zeros((T, n, 2 * args.lines + 1), np.float32)
    x[: args.cue, :, :-1] = cue.reshape(args.cue, n, 2 * args.lines)
    x[args.cue + args.delay :, :, -1] = 1.0  # the go cue: "answer now"
    return x, labels


def ideal_observer_accuracy(x: np.ndarray, labels: np.ndarray, lines: int) -> float:
    """Accuracy of comparing the two channels' total spike counts (ties: a coin flip)."""
    counts = x[:, :, :-1].reshape(x.shape[0], x.shape[1], 2, lines).sum((0, 3))
    right = (counts[:, 0] > counts[:, 1]) == (labels == 1)
    return float(np.where(counts[:, 0] == counts[:, 1], 0.5, right).mean())


def decision_targets(labels, args):
    """Per-step targets ``(T, B, 2)``: the one-hot label in the decision window, zeros
    elsewhere, so the cross-entropy below is zero outside the window."""
    T = args.cue + args.delay + args.decision
    window = (jnp.arange(T) >= T - args.decision).astype(jnp.float32)
    return window[:, None, None] * jax.nn.one_hot(labels, 2)[None]


def cross_entropy(logits, target):
    """Loss of ONE sample at one step (the learner vmaps it and means over the batch).

    ``target`` is a one-hot label inside the decision window and zeros outside it,
    where the loss is therefore zero.
    """
    return optax.softmax_cross_entropy(logits, target)


# -- model --------------------------------------------------------------------------------


class SpikingAccumulator(eqx.Module):
    """LIF layer (input weights, bias and membrane decays trace-trained) + spike readout.

    Called on one sample as ``model(x, hidden) -> (hidden, logits)``, the learner's
    convention; ``hidden = (v, i)`` (membrane potential, synaptic current).
    """

    cell: bte.LIFCell
    readout: eqx.nn.Linear  # plain Equinox: reaches no hidden state, exact gradient
    #: LIF sub-steps per input frame (a lax.fori_loop; the compiler moves the cell's
    #: ETP ops, whose input is the same every sub-step, before the loop).
    substeps: int = eqx.field(static=True, default=1)

    def __call__(self, x, hidden):
        if self.substeps == 1:
            hidden = self.cell(x, hidden)
        else:
            hidden = jax.lax.fori_loop(0, self.substeps, lambda _, h: self.cell(x, h), hidden)
        return hidden, self.readout(self.cell.spike(hidden))


def init_model(key, n_in: int, args) -> SpikingAccumulator:
    k_cell, k_out = jax.random.split(key)
    cell = bte.LIFCell(n_in, args.hidden, key=k_cell)
    # Start from a spread of membrane time constants (a in [0.8, 0.98], tau 4.5-50
    # steps) rather than one value: the gradient then finds which neurons are slow
    # enough to hold the evidence and tunes the rest.
    a = jnp.linspace(0.8, 0.98, args.hidden)
    cell = eqx.tree_at(lambda c: c.decay.weight, cell, jnp.log(a / (1 - a)))
    readout = eqx.nn.Linear(args.hidden, 2, key=k_out)
    return SpikingAccumulator(cell, readout, getattr(args, "substeps", 1))


def zero_state(batch: int, n: int):
    return jnp.zeros((batch, n)), jnp.zeros((batch, n))


def time_constants(model) -> np.ndarray:
    """Membrane time constants ``tau = -1 / log(a)`` in steps."""
    a = jax.nn.sigmoid(model.cell.decay.weight)
    return np.asarray(-1.0 / jnp.log(a))


# -- evaluation ---------------------------------------------------------------------------


@eqx.filter_jit
def evaluate(model, x, labels, decision: int):
    """Test accuracy and spike rate, running the plain model (no learner needed)."""

    def body(hidden, x_t):
        hidden, logits = jax.vmap(model)(x_t, hidden)
        return hidden, (logits, model.cell.spike(hidden))

    _, (logits, spikes) = jax.lax.scan(body, zero_state(x.shape[1], model.cell.hidden_size), x)
    answer = jnp.argmax(logits[-decision:].sum(0), -1)
    return jnp.mean(answer == labels), spikes.mean()


def gradient_cosines(model, algorithm, x, labels, args) -> dict:
    """Cosine between this algorithm's trial gradient and BPTT's, per cell leaf."""

    def trial_grads(algo):
        learner = bte.compile(model, cross_entropy, algo, batched=True)
        state = learner.init(model, zero_state(x.shape[1], args.hidden), x[0])
        return eqx.filter_jit(learner.scan)(model, state, x, decision_targets(labels, args))[1]

    mine, ref = trial_grads(algorithm), trial_grads(bt.BPTT())
    leaves = {
        "input_weight": lambda g: g.cell.linear.weight,
        "input_bias": lambda g: g.cell.linear.bias,
        "decay": lambda g: g.cell.decay.weight,
    }
    out = {}
    for name, get in leaves.items():
        a, b = jnp.ravel(get(mine)), jnp.ravel(get(ref))
        out[name] = round(float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))), 4)
    return out


# -- training -----------------------------------------------------------------------------


def train(name: str, data, args, progress: tqdm) -> dict:
    """Train a fresh model (same init for every algorithm) and return its history."""
    (x_train, y_train), (x_test, y_test) = data
    model = init_model(jax.random.PRNGKey(args.seed), x_train.shape[-1], args)
    tau_start = time_constants(model)
    algorithm = bt.algorithm_by_name(name, decay_or_rank=args.pp_decay)
    learner = bte.compile(model, cross_entropy, algorithm, batched=True)
    if args.verbose:
        x0 = jnp.asarray(x_train[0, : args.batch_size])
        print(learner.report(model, zero_state(args.batch_size, args.hidden), x0))
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(learner.params(model))

    @eqx.filter_jit
    def update(model, opt_state, x, labels):
        # Fresh neurons and zero traces at the start of every trial.
        state = learner.init(model, zero_state(x.shape[1], args.hidden), x[0])
        (losses, logits), grads, _ = learner.scan(model, state, x, decision_targets(labels, args))
        updates, opt_state = optimizer.update(grads, opt_state, learner.params(model))
        # losses[t] is the batch-mean loss of step t (zero outside the decision window).
        loss = losses.sum() / args.decision
        accuracy = jnp.mean(jnp.argmax(logits[-args.decision :].sum(0), -1) == labels)
        return eqx.apply_updates(model, updates), opt_state, loss, accuracy

    rng = np.random.default_rng(args.seed + 1)  # the same batches for every algorithm
    history = {"loss": [], "batch_acc": [], "eval_at": [], "test_acc": [], "spike_rate": []}
    start = time.perf_counter()
    for it in range(1, args.iterations + 1):
        idx = rng.integers(0, x_train.shape[1], args.batch_size)
        model, opt_state, loss, acc = update(
            model, opt_state, jnp.asarray(x_train[:, idx]), jnp.asarray(y_train[idx])
        )
        history["loss"].append(float(loss))
        history["batch_acc"].append(float(acc))
        if it % args.eval_every == 0 or it == args.iterations:
            test_acc, rate = evaluate(model, x_test, y_test, args.decision)
            history["eval_at"].append(it)
            history["test_acc"].append(float(test_acc))
            history["spike_rate"].append(float(rate))
            progress.set_postfix(alg=name, loss=f"{float(loss):.3f}", test=f"{float(test_acc):.3f}")
        progress.update()
    history["seconds"] = round(time.perf_counter() - start, 1)
    history["tau_start"], history["tau_end"] = tau_start, time_constants(model)
    return history


# -- plotting -----------------------------------------------------------------------------


def plot_time_constants(histories: dict):
    """The third panel: membrane time constants before and after training."""

    def draw(ax):
        first = next(iter(histories.values()))
        top = max(float(h["tau_end"].max()) for h in histories.values()) + 5
        bins = np.linspace(0, top, 30)
        ax.hist(first["tau_start"], bins=bins, alpha=0.4, color="grey", label="initial")
        for name, h in histories.items():
            ax.hist(h["tau_end"], bins=bins, histtype="step", lw=2, label=f"{name} (trained)")
        ax.set(
            xlabel="membrane time constant (steps)",
            ylabel="neurons",
            title="trainable time constants",
        )

    return draw


# -- command line -------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="d_rtrl",
        help="online algorithm (or the BPTT reference)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also train BPTT from the same init on the same batches",
    )
    p.add_argument("--pp-decay", type=float, default=0.9, help="pp_prop's trace decay")
    p.add_argument("--iterations", type=int, default=3000, help="Adam updates")
    p.add_argument(
        "--substeps", type=int, default=1, help="LIF sub-steps per input step (a fori_loop)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="trials per update")
    p.add_argument("--hidden", type=int, default=64, help="LIF neurons")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--cue", type=int, default=50, help="cue steps")
    p.add_argument("--delay", type=int, default=10, help="silent steps before the decision")
    p.add_argument("--decision", type=int, default=10, help="decision-window steps")
    p.add_argument("--lines", type=int, default=10, help="input neurons per channel")
    p.add_argument("--rate", type=float, default=0.05, help="mean input spike probability/step")
    p.add_argument("--train-trials", type=int, default=8192, help="trials to train on")
    p.add_argument("--test-trials", type=int, default=1024, help="held-out trials to score")
    p.add_argument("--eval-every", type=int, default=100, help="updates between test evals")
    common.add_run_flags(
        p,
        quick_help="tiny run for smoke tests (seconds)",
        verbose_help="print the compile report",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.batch_size, args.hidden = 20, 16, 16
        args.train_trials, args.test_trials, args.eval_every = 256, 256, 10
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x, y = make_trials(args.train_trials + args.test_trials, args, rng)
    n = args.train_trials
    data = (x[:, :n], y[:n]), (jnp.asarray(x[:, n:]), jnp.asarray(y[n:]))
    ideal = ideal_observer_accuracy(x[:, n:], y[n:], args.lines)

    names = [args.algorithm] + (["bptt"] if args.compare and args.algorithm != "bptt" else [])
    histories = {}
    with common.progress(len(names) * args.iterations, unit="update", quiet=args.quiet) as progress:
        for name in names:
            histories[name] = train(name, data, args, progress)

    T = args.cue + args.delay + args.decision
    png = common.plot_path(args, f"eqx_lif_snn_{'_vs_'.join(names)}")
    title = (
        f"Equinox LIF network, evidence accumulation (T={T}, {args.hidden} neurons; "
        f"chance {CHANCE:.0%}, ideal observer {ideal:.1%})"
    )
    common.plot_training(
        histories,
        png,
        title,
        chance=CHANCE,
        ideal=ideal,
        log_loss=False,
        loss_label="cross-entropy per decision step",
        extra=plot_time_constants(histories),
    )
    for name, h in histories.items():
        print(
            f"{name:8s} test accuracy {h['test_acc'][-1]:.3f} in {h['seconds']:.1f} s "
            f"(spike rate {h['spike_rate'][-1]:.3f}/step, median tau "
            f"{np.median(h['tau_end']):.1f} steps)"
        )
    print(f"ideal observer {ideal:.3f}, chance {CHANCE:.3f}; plot: {png}")

    main_h = histories[args.algorithm]
    summary = {
        "example": "eqx_lif_snn",
        "algorithm": args.algorithm,
        "test_accuracy": main_h["test_acc"][-1],
        "best_test_accuracy": max(main_h["test_acc"]),
        "chance": CHANCE,
        "ideal_observer_accuracy": round(ideal, 4),
        "seconds": main_h["seconds"],
        "total_seconds": round(time.perf_counter() - start, 1),
        "iterations": args.iterations,
        "steps_per_trial": T,
        "hidden": args.hidden,
        "spike_rate": round(main_h["spike_rate"][-1], 4),
        "median_tau_steps": round(float(np.median(main_h["tau_end"])), 2),
        "seed": args.seed,
        "plot": str(png) if png else None,
    }
    if args.algorithm != "bptt":
        # How close the online gradient is to the exact one, on the initial model.
        x0, y0 = jnp.asarray(x[:, :256]), jnp.asarray(y[:256])
        init = init_model(jax.random.PRNGKey(args.seed), x.shape[-1], args)
        summary["grad_cosine_vs_bptt_at_init"] = gradient_cosines(
            init, bt.algorithm_by_name(args.algorithm, decay_or_rank=args.pp_decay), x0, y0, args
        )
    if "bptt" in histories and args.algorithm != "bptt":
        summary["bptt_test_accuracy"] = histories["bptt"]["test_acc"][-1]
        summary["bptt_seconds"] = histories["bptt"]["seconds"]
    return common.print_summary(summary)


if __name__ == "__main__":
    main()
