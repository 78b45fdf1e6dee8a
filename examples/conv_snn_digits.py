"""A convolutional spiking network learns the 8x8 digits online, from spike frames.

The task
--------
scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no download; a stratified
80/20 split with a fixed seed) are *rate coded*: a pixel of intensity ``p`` in
``[0, 1]`` fires with probability ``--max-rate * p`` at each of ``--steps`` time steps
(default 20), so an image becomes a short movie of binary frames ``(1, 8, 8)``. The
frames are drawn once with a fixed seed (the same for every row). The network answers
with the class whose readout, summed over the steps, is largest (chance 10%).

The network (Equinox, one sample per call, hidden ``((v1, i1), (v2, i2))``)
------------------------------------------------------------------------------
- a convolutional LIF layer: :class:`braintrace_eqx.ETPConv2d` (the twin of
  ``eqx.nn.Conv2d``; ``--channels`` 3x3 filters, stride 1, ``SAME`` padding) drives
  the synaptic current of ``channels x 8 x 8`` LIF neurons directly,
  ``i1 = syn_decay * i1 + conv(x)`` then the membrane ``v1``
  (:func:`braintrace.surrogate.lif_step`, fixed decays, reset by the previous spike);
- a spiking dense layer: :class:`braintrace_eqx.ETPLIFCell` reads the flattened
  spikes of the conv layer (``--hidden`` neurons, trainable input weights, bias and
  membrane decays);
- a readout: a plain ``eqx.nn.Linear`` from the dense layer's spikes to ten logits,
  scored by cross-entropy at every step (the loss is the mean over the steps).

Spikes are Heaviside steps with a fast-sigmoid surrogate derivative
(:func:`braintrace.spike`).

The rows (``--rows``; one Adam update per mini-batch of movies, ``learner.scan``)
----------------------------------------------------------------------------------
- ``d_rtrl``   eligibility traces of the conv kernel and of the dense weights, per
  sample. The conv op is the op that drives its membranes, so its relation is exact;
  the conv trace is kept per output position (``docs/algorithms.md``, "Convolution":
  ``P (K + 1) C_out S`` numbers per sample). The conv layer sits *below* the dense
  layer, so its kernel's gradient is the diagonal approximation (the credit that
  reaches it through the dense layer's memory is cut: the compile report,
  ``--verbose``, says *approximate*); the dense layer and the readout are exact.
- ``pp_prop``  factorised traces: an input-shaped and an output-shaped trace per op
  (``--decay``), much smaller than D-RTRL's.
- ``bptt``     the exact reference: backpropagation through the stored movie.
- ``one_step`` the control: each step's own gradient, no traces. The conv kernel and
  the dense weights then see only the current frame's effect on the membranes.

What to expect
--------------
The dense layer's gradient is BPTT's under D-RTRL (cosine 1.0 on the initial model);
the conv kernel's is not (about 0.86-0.89: the path through the dense layer's memory
is missing), and neither is pp_prop's. The image is the same at every step, only its
spikes are fresh, so every frame carries the class and even the one-step gradient
points roughly the right way: on this task the traces buy one to two points of
accuracy (seeds 0 and 1: D-RTRL 0.947 and 0.925, BPTT 0.939 and 0.936, ``one_step``
0.931 and 0.903), not the difference between learning and not learning
(``examples/long_range.py`` shows that case). D-RTRL's trace is the largest:
weight-sized per sample for the dense layer (``512 x 64 x 2`` numbers) and per output
position for the conv kernel (``64 x 10 x 8 x 2``), 297 KiB per sample, against 7 KiB
for pp_prop.

Per row the JSON gives the test accuracy after training, the training seconds
(compiles excluded; the per-epoch evaluations included) and the trace memory of the
training batch in MiB (the compile report's bytes per sample times the batch size; 0
for BPTT and ``one_step``, which keep no traces: BPTT stores the ``T`` steps'
activations instead). The ``grad_cosine_vs_bptt_at_init`` entry gives, per
trace-trained leaf, the cosine between each row's gradient and BPTT's on the initial
model and the first training batch. Measured numbers are in the README's examples
table.

Run
---
``python examples/conv_snn_digits.py``               (the four rows; under 2 minutes on 2 CPU cores)
``python examples/conv_snn_digits.py --rows d_rtrl bptt``
``python examples/conv_snn_digits.py --quick``       (a smoke run: about 15 s, compiles mostly)

The plot (loss, test accuracy, trace memory per row) goes to ``--out``
(``conv_snn_digits.png``, ``conv_snn_digits_quick.png`` with ``--quick``; none with
``--no-plot``). The last stdout line is
``{"example": "conv_snn_digits", "rows": {name: {"test_accuracy", "seconds",
"trace_MiB", ...}}, ...}``.
"""

from __future__ import annotations

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common as common
import braintrace as bt
import braintrace_eqx as bte
from braintrace.surrogate import lif_step

ROWS = ("d_rtrl", "pp_prop", "bptt", "one_step")
NUM_CLASSES = common.DIGIT_CLASSES
SIDE = 8  # the digits are 8 x 8 pixels


# -- data ---------------------------------------------------------------------------------


def load_spike_frames(steps: int, max_rate: float, seed: int = common.SPLIT_SEED):
    """Rate-coded digits: ``x_train, x_test, y_train, y_test``.

    ``x`` is time-major float32 spikes ``(steps, N, 1, 8, 8)`` (a pixel of intensity
    ``p`` fires with probability ``max_rate * p`` per step), ``y`` int32 labels; the
    split and the spikes are fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if steps < 1 or not 0.0 < max_rate <= 1.0:
        raise ValueError(
            f"conv_snn_digits: --steps must be >= 1 and --max-rate in (0, 1], got "
            f"{steps} and {max_rate}"
        )
    digits = load_digits()
    images = (digits.data / 16.0).reshape(-1, 1, SIDE, SIDE)
    split = train_test_split(
        images,
        digits.target.astype(np.int32),
        test_size=0.2,
        random_state=seed,
        stratify=digits.target,
    )
    rng = np.random.default_rng(seed)

    def encode(x):
        spikes = rng.random((steps, *x.shape)) < max_rate * x[None]
        return spikes.astype(np.float32)

    return encode(split[0]), encode(split[1]), split[2], split[3]


def every_step_targets(labels, steps: int):
    """The label at every step, time-major ``(steps, B)`` (the loss scores every step)."""
    return jnp.broadcast_to(jnp.asarray(labels), (steps, len(labels)))


def cross_entropy(logits, label):
    """Loss of ONE sample at one step (the learner vmaps it and averages the batch)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, label)


# -- model --------------------------------------------------------------------------------


class ConvSNN(eqx.Module):
    """Conv LIF layer -> spiking dense layer -> linear readout, one sample per call.

    ``model(x, hidden) -> (hidden, logits)`` with ``x (1, 8, 8)`` and ``hidden =
    ((v1, i1), (v2, i2))``: ``v1, i1 (channels, 8, 8)``, ``v2, i2 (hidden,)``.
    """

    conv: bte.ETPConv2d  # drives the conv layer's synaptic current: the ETP conv op
    dense: bte.ETPLIFCell  # spikes of the conv layer -> LIF neurons (ETP dense op)
    readout: eqx.nn.Linear  # plain Equinox: reaches no hidden state, exact gradient
    mem_decay: float = eqx.field(static=True, default=0.9)
    syn_decay: float = eqx.field(static=True, default=0.8)
    threshold: float = eqx.field(static=True, default=1.0)
    slope: float = eqx.field(static=True, default=4.0)

    def conv_layer(self, x, conv_state):
        """One step of the conv LIF layer: the ETP conv op drives the current ``i1``."""
        v1, i1 = conv_state
        return lif_step(
            v1,
            i1,
            self.conv(x),
            self.mem_decay,
            syn_decay=self.syn_decay,
            threshold=self.threshold,
            slope=self.slope,
        )

    def conv_spikes(self, conv_state):
        """The conv layer's spikes ``(channels, 8, 8)``."""
        return bt.spike(conv_state[0] - self.threshold, self.slope)

    def __call__(self, x, hidden):
        conv_state = self.conv_layer(x, hidden[0])
        dense_state = self.dense(jnp.ravel(self.conv_spikes(conv_state)), hidden[1])
        return (conv_state, dense_state), self.readout(self.dense.spike(dense_state))


def init_model(key, args) -> ConvSNN:
    """A fresh network (the same for every row at one ``--seed``)."""
    k_conv, k_dense, k_out = jax.random.split(key, 3)
    conv = bte.ETPConv2d(1, args.channels, 3, padding="SAME", key=k_conv)
    # eqx's uniform(+-1/sqrt(9)) kernel drives too few neurons to threshold from sparse
    # input spikes: scale it so that the conv layer fires from the first update.
    conv = eqx.tree_at(lambda c: c.weight, conv, conv.weight * args.conv_gain)
    n_conv = args.channels * SIDE * SIDE
    dense = bte.ETPLIFCell(n_conv, args.hidden, key=k_dense)
    dense = eqx.tree_at(lambda c: c.linear.weight, dense, dense.linear.weight * args.dense_gain)
    readout = eqx.nn.Linear(args.hidden, NUM_CLASSES, key=k_out)
    return ConvSNN(conv, dense, readout)


def zero_state(batch: int, channels: int, hidden: int):
    """Resting neurons ``((v1, i1), (v2, i2))`` for a batch of ``batch`` movies."""
    conv = jnp.zeros((batch, channels, SIDE, SIDE))
    dense = jnp.zeros((batch, hidden))
    return (conv, conv), (dense, dense)


@eqx.filter_jit
def evaluate(model, x, labels):
    """Accuracy (argmax of the logits summed over the steps) and the two spike rates."""

    def body(hidden, x_t):
        hidden, logits = jax.vmap(model)(x_t, hidden)
        rates = model.conv_spikes(hidden[0]).mean(), model.dense.spike(hidden[1]).mean()
        return hidden, (logits, rates)

    hidden = zero_state(x.shape[1], model.conv.out_channels, model.dense.hidden_size)
    _, (logits, rates) = jax.lax.scan(body, hidden, x)
    accuracy = jnp.mean(jnp.argmax(logits.sum(0), -1) == labels)
    return accuracy, rates[0].mean(), rates[1].mean()


# -- training -----------------------------------------------------------------------------


def make_learner(model, name: str, args):
    algorithm = bt.algorithm_by_name(name, decay_or_rank=args.decay)
    return bte.compile(model, cross_entropy, algorithm, batched=True)


def trace_bytes_per_sample(learner, model, args) -> int:
    """Bytes of every op's trace per sample (the compile report's figure; 0: no traces)."""
    x0 = jnp.zeros((args.batch_size, 1, SIDE, SIDE))
    report = learner.report(model, zero_state(args.batch_size, args.channels, args.hidden), x0)
    if args.verbose:
        print(report)
    return int(sum(n for _, n in report.trace_memory))


def make_update(learner, optimizer, args):
    """One jitted Adam update on a time-major batch ``(x, labels)``: fresh neurons and
    zero traces at the start of every movie."""

    @eqx.filter_jit
    def update(model, opt_state, x, labels):
        state = learner.init(model, zero_state(x.shape[1], args.channels, args.hidden), x[0])
        targets = every_step_targets(labels, x.shape[0])
        (losses, _), grads, _ = learner.scan(model, state, x, targets)
        # learner.scan sums the per-step gradients: the mean over the steps is Adam's input.
        grads = jax.tree_util.tree_map(lambda g: g / x.shape[0], grads)
        updates, opt_state = optimizer.update(grads, opt_state, learner.params(model))
        return eqx.apply_updates(model, updates), opt_state, losses.mean(), grads

    return update


def train(name: str, data, args, progress) -> dict:
    """Train a fresh model with one row's algorithm; returns its history."""
    x_train, x_test, y_train, y_test = data
    model = init_model(jax.random.PRNGKey(args.seed), args)
    learner = make_learner(model, name, args)
    per_epoch = common.batches_per_epoch(x_train.shape[1], args.batch_size, args.max_batches)
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.epochs * per_epoch))
    opt_state = optimizer.init(learner.params(model))
    update = make_update(learner, optimizer, args)
    # Compile before the clock starts; keep the gradient on the initial model and the
    # first batch (the JSON compares it with BPTT's).
    first = np.arange(args.batch_size)
    grads = update(model, opt_state, jnp.asarray(x_train[:, first]), jnp.asarray(y_train[first]))
    evaluate(model, x_test, y_test), evaluate(model, x_train, y_train)
    history = {
        "loss": [],
        "eval_at": [],
        "test_acc": [],
        "train_acc": [],
        "grads_at_init": grads[-1],
    }
    history["trace_bytes_per_sample"] = trace_bytes_per_sample(learner, model, args)
    rng = np.random.default_rng(args.seed + 1)  # the same batches for every row
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for idx in common.minibatches(x_train.shape[1], args.batch_size, rng, args.max_batches):
            x, y = jnp.asarray(x_train[:, idx]), jnp.asarray(y_train[idx])
            model, opt_state, loss, _ = update(model, opt_state, x, y)
            history["loss"].append(float(loss))
            progress.update()
        test_acc, *rates = evaluate(model, x_test, y_test)
        history["eval_at"].append(len(history["loss"]))
        history["test_acc"].append(float(test_acc))
        history["train_acc"].append(float(evaluate(model, x_train, y_train)[0]))
        history["spike_rates"] = [round(float(r), 4) for r in rates]
        progress.set_postfix(row=name, epoch=epoch, test=f"{float(test_acc):.3f}")
    history["seconds"] = round(time.perf_counter() - start, 3)
    return history


#: The leaves that traces train, by name (the JSON's gradient cosines).
TRACED_LEAVES = {
    "conv_kernel": lambda m: m.conv.weight,
    "conv_bias": lambda m: m.conv.bias,
    "dense_weight": lambda m: m.dense.linear.weight,
    "dense_bias": lambda m: m.dense.linear.bias,
    "dense_decay": lambda m: m.dense.decay.weight,
}


def gradient_cosines(histories: dict) -> dict:
    """Cosine between each row's gradient and BPTT's on the initial model and the first
    batch, per traced leaf (``{}`` without a ``bptt`` row)."""
    if "bptt" not in histories:
        return {}
    ref = histories["bptt"]["grads_at_init"]
    out = {}
    for name, h in histories.items():
        if name == "bptt":
            continue
        out[name] = {}
        for leaf, get in TRACED_LEAVES.items():
            a, b = jnp.ravel(get(h["grads_at_init"])), jnp.ravel(get(ref))
            cosine = a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-30)
            out[name][leaf] = round(float(cosine), 4)
    return out


# -- plot and summary ---------------------------------------------------------------------


def plot_trace_memory(histories: dict, args):
    """The third panel: each row's trace memory for the training batch."""

    def draw(ax):
        names = list(histories)
        mib = [h["trace_bytes_per_sample"] * args.batch_size / 2**20 for h in histories.values()]
        for i, (name, value) in enumerate(zip(names, mib)):
            ax.bar(name, value, color=f"C{i}", label=f"{name}: {value:.2f} MiB")
        ax.set(ylabel="MiB", title=f"trace memory, batch of {args.batch_size}")

    return draw


def summarize(histories: dict, cosines: dict, args, png, total_seconds: float) -> dict:
    rows = {}
    for name, h in histories.items():
        rows[name] = {
            "test_accuracy": round(h["test_acc"][-1], 4),
            "train_accuracy": round(h["train_acc"][-1], 4),
            "seconds": h["seconds"],
            "trace_MiB": round(h["trace_bytes_per_sample"] * args.batch_size / 2**20, 3),
            "trace_KiB_per_sample": round(h["trace_bytes_per_sample"] / 1024, 2),
            "spike_rates": h["spike_rates"],
        }
    return {
        "example": "conv_snn_digits",
        "rows": rows,
        "grad_cosine_vs_bptt_at_init": cosines,
        "steps": args.steps,
        "channels": args.channels,
        "hidden": args.hidden,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "chance": 1 / NUM_CLASSES,
        "seed": args.seed,
        "total_seconds": round(total_seconds, 1),
        "plot": str(png) if png else None,
    }


# -- command line -------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument(
        "--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to train, in order"
    )
    p.add_argument("--steps", type=int, default=20, help="spike frames per image (T)")
    p.add_argument("--max-rate", type=float, default=0.5, help="spike probability of a full pixel")
    p.add_argument("--channels", type=int, default=8, help="conv filters (3x3, stride 1)")
    p.add_argument("--hidden", type=int, default=64, help="neurons of the spiking dense layer")
    p.add_argument("--conv-gain", type=float, default=6.0, help="scale of the initial kernel")
    p.add_argument(
        "--dense-gain", type=float, default=8.0, help="scale of the initial dense weights"
    )
    p.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="movies per update")
    p.add_argument("--max-batches", type=int, default=0, help="cap batches per epoch (0: all)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam peak learning rate (cosine decay)")
    p.add_argument("--decay", type=float, default=0.9, help="pp_prop's trace decay")
    common.add_run_flags(
        p,
        quick_help="smoke run: 2 epochs of 3 batches, T=6, a small network",
        verbose_help="print each row's compile report",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_batches, args.steps = 2, 3, 6
        args.channels, args.hidden, args.batch_size = 2, 16, 16
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_spike_frames(args.steps, args.max_rate)
    per_epoch = common.batches_per_epoch(data[0].shape[1], args.batch_size, args.max_batches)
    histories = {}
    with common.progress(len(args.rows) * args.epochs * per_epoch, quiet=args.quiet) as bar:
        for name in args.rows:
            histories[name] = train(name, data, args, bar)
    cosines = gradient_cosines(histories)
    png = common.plot_path(args, "conv_snn_digits")
    title = (
        f"conv LIF ({args.channels} x 8 x 8) -> spiking dense ({args.hidden}) -> readout, "
        f"8x8 digits as {args.steps} spike frames"
    )
    common.plot_training(
        histories,
        png,
        title,
        chance=1 / NUM_CLASSES,
        loss_label="cross-entropy per step",
        extra=plot_trace_memory(histories, args),
    )
    for name, h in histories.items():
        print(
            f"{name:8s} test accuracy {h['test_acc'][-1]:.3f} (train {h['train_acc'][-1]:.3f}) "
            f"in {h['seconds']:.1f} s, trace {h['trace_bytes_per_sample'] / 1024:.1f} KiB/sample"
        )
    print(f"plot: {png}" if png else "plot: none (--no-plot)")
    summary = summarize(histories, cosines, args, png, time.perf_counter() - start)
    return common.print_summary(summary)


if __name__ == "__main__":
    main()
