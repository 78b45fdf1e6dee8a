"""A stock Flax GRU learns to classify handwritten digits online, pixel pair by pixel pair.

What is learned
---------------
scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no download) are read
as a *sequence*: at step ``t`` the network sees the next ``--chunk`` pixels in
reading order (default 2, so ``T = 32`` steps per image; ``--chunk 8`` feeds one row
per step, ``T = 8``, an easier task). A stock ``flax.linen.GRUCell`` keeps a memory
of what it has seen; a linear readout turns its state into class logits at every
step, and only the logits of the LAST step count (the loss mask below). Chance level
is 10%. Train/test: a stratified 80/20 split with a fixed seed.

How online learning is used
---------------------------
``braintrace_flax.compile(model, loss_fn, algorithm, convert_dense=True)`` reroutes
the GRU's six ``nn.Dense`` gate layers through braintrace's ETP dense op, so each gate
kernel carries an *eligibility trace*: a running summary, updated forward in time, of
how the hidden state depends on that kernel. At every step the learner returns a
gradient for every parameter (the exact one-step gradient plus the trace credit
``<dl_t/dh_{t-1}, eps_{t-1}>``), so nothing has to be stored per time step:

- ``--algorithm d_rtrl``  weight-sized traces (diagonal RTRL); memory O(|W|), not O(T);
- ``--algorithm pp_prop`` input- plus output-sized traces (cheaper, coarser);
- ``--algorithm bptt``    the exact reference: backprop through the stored sequence;
- ``--algorithm one_step`` the control: each step's own gradient, no traces.

Why one optimizer update per sequence: the loss lives on the last step only, so
the gradients of steps ``0..T-2`` are zero and updating after every step would only
let Adam's momentum drift the weights. ``learner.scan`` runs the sequence step by
step, adds the per-step gradients in its carry (memory independent of ``T`` for the
online algorithms) and we apply one Adam update per mini-batch of sequences. With a
loss on every step you would call ``learner.step`` and update every step instead
(see the README's quickstart).

The GRU has recurrent kernels, so D-RTRL and pp_prop are *approximations* here: the
diagonal trace drops the path through ``W_h h`` (how a kernel changed earlier
hidden states that then feed the recurrent gates). pp_prop further factorises each
kernel's trace into an input-sized and an output-sized vector, which blurs which
input arrived when. ``--algorithm one_step`` (no traces at all, only each step's
own gradient) is the control that shows what the traces add. The README's examples
table has the measured accuracies and times.

Memory: the online algorithms never store the sequence, but D-RTRL's trace is
weight-sized per sample (``--verbose`` prints the compile report with the trace
memory), so at ``T = 32`` BPTT is still cheaper in memory and time; online learning
pays off for long or unbounded streams.

Run ``python examples/flax_gru_digits.py``, ``--compare`` to train BPTT beside the
online algorithm on the same plot, ``--quick`` for a seconds-long smoke run,
``--verbose`` to print the compile report. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

import _common as common
import braintrace as bt
import braintrace_flax as btf

NUM_CLASSES = common.DIGIT_CLASSES
ALGORITHMS = bt.ALGORITHM_NAMES


# -- model ------------------------------------------------------------------------------


class GRUClassifier(nn.Module):
    """One step: a stock ``nn.GRUCell`` and a linear readout to class logits."""

    hidden: int

    @nn.compact
    def __call__(self, h, x):
        h, y = nn.GRUCell(self.hidden, name="gru")(h, x)
        # The readout reaches no hidden state: every algorithm gives it its exact gradient.
        return h, nn.Dense(NUM_CLASSES, name="readout")(y)


# -- training -----------------------------------------------------------------------------


def accuracy_fn(model):
    """``accuracy(params, x, y)``: run the sequences forward and read the last step."""
    step = btf.make_step(model)  # plain forward pass: no traces needed to evaluate

    @jax.jit
    def accuracy(params, x, y):
        h0 = jnp.zeros((x.shape[1], model.hidden), jnp.float32)
        _, logits = jax.lax.scan(lambda h, xt: step(params, h, xt), h0, x)
        return jnp.mean(jnp.argmax(logits[-1], -1) == y)

    return accuracy


def train(algorithm: str, data, args, progress: tqdm) -> dict:
    """Train one model with ``algorithm``; returns its loss/accuracy history."""
    x_train = data[0]
    model = GRUClassifier(args.hidden)
    learner = btf.compile(
        model,
        common.last_step_cross_entropy,
        bt.algorithm_by_name(algorithm, decay_or_rank=args.decay),
        convert_dense=True,
    )
    h0 = jnp.zeros((args.batch_size, args.hidden), jnp.float32)
    x0 = jnp.zeros((args.batch_size, x_train.shape[-1]), jnp.float32)
    params = model.init(jax.random.key(args.seed), h0, x0)["params"]
    if args.verbose:
        tqdm.write(str(learner.report(params, h0, x0)))  # how every parameter is trained
    opt = common.digits_adam(args, len(x_train))
    opt_state = opt.init(params)

    @jax.jit
    def update(carry, xs, targets):
        params, opt_state = carry
        # Fresh zero hidden state and zero traces for every batch of new sequences.
        state = learner.init(params, h0, xs[0])
        (losses, _), grads, _ = learner.scan(params, state, xs, targets)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), losses.sum()

    accuracy = accuracy_fn(model)
    _, history = common.fit_digits(
        update,
        lambda carry, x, y: accuracy(carry[0], x, y),
        (params, opt_state),
        data,
        args,
        progress,
        algorithm,
    )
    return history


def parse_args(argv=None):
    return common.digits_args(__doc__, argv, ALGORITHMS)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return common.run_digits_job("flax_gru_digits", "Flax GRU on sequential digits", train, args)


if __name__ == "__main__":
    main()
