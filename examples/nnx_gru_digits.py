"""A stock Flax NNX GRU learns to classify handwritten digits online, pixel pair by pixel pair.

What is learned
---------------
The task of ``flax_gru_digits.py``, in Flax's NNX API: scikit-learn's bundled 8x8
digits (1797 images, 10 classes, no download) are read as a *sequence*, the next
``--chunk`` pixels per step (default 2, so ``T = 32`` steps per image). A stock
``nnx.GRUCell`` keeps a memory of what it has seen, an ``nnx.Linear`` readout turns
its state into class logits at every step, and only the LAST step's logits count.
Chance level is 10%. Train/test: a stratified 80/20 split with a fixed seed.

How online learning is used
---------------------------
``braintrace_flax.nnx.convert(model)`` makes every ``nnx.Linear`` in the model run
through braintrace's ETP dense op, in place: the ``Param`` objects and
``nnx.state(model)`` stay exactly as they were. NNX's GRU fuses its three gates into
one ``dense_i`` kernel ``(in, 3H)`` and one ``dense_h`` kernel ``(H, 3H)`` and splits
their outputs; braintrace follows each gate through that split (its compiler's index
maps), so each kernel carries an *eligibility trace* with the model's own parameter
tree, checkpoints and optimizer state. ``braintrace_flax.nnx.compile(model, loss,
algorithm)`` gives the learner; its ``grads`` is an ``nnx.State`` that
``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads)`` applies directly:

- ``--algorithm d_rtrl``  weight-sized traces (diagonal RTRL); memory O(|W|), not O(T);
- ``--algorithm pp_prop`` input- plus output-sized traces (cheaper, coarser);
- ``--algorithm bptt``    the exact reference: backprop through the stored sequence;
- ``--algorithm one_step`` the control: each step's own gradient, no traces.

As in the linen example, the loss lives on the last step only, so ``learner.scan``
adds the per-step gradients over the sequence and the optimizer updates once per
mini-batch of sequences. ``--verbose`` prints the compile report (how every ``Param``
is trained, and the trace memory). The README's examples table has the measured
accuracies and times.

Run ``python examples/nnx_gru_digits.py``, ``--compare`` to train BPTT beside the
online algorithm on the same plot, ``--quick`` for a seconds-long smoke run. The last
stdout line is a JSON summary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

import _common as common
import braintrace as bt
from braintrace_flax import nnx as btnnx

NUM_CLASSES = common.DIGIT_CLASSES
ALGORITHMS = bt.ALGORITHM_NAMES


# -- model ------------------------------------------------------------------------------


class GRUClassifier(nnx.Module):
    """One step ``(h, x) -> (h, logits)``: a stock ``nnx.GRUCell`` and a linear readout."""

    def __init__(self, n_in: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.gru = nnx.GRUCell(n_in, hidden, rngs=rngs)
        # The readout reaches no hidden state: every algorithm gives it its exact gradient.
        self.readout = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, h, x):
        h, y = self.gru(h, x)
        return h, self.readout(y)


# -- training -----------------------------------------------------------------------------


@nnx.jit
def accuracy(model: GRUClassifier, x, y):
    """Run time-major sequences ``x (T, B, C)`` forward and score the last step."""
    h0 = jnp.zeros((x.shape[1], model.hidden), jnp.float32)
    _, logits = jax.lax.scan(lambda h, xt: model(h, xt), h0, x)
    return jnp.mean(jnp.argmax(logits[-1], -1) == y)


def train(algorithm: str, data, args, progress: tqdm) -> dict:
    """Train one model with ``algorithm``; returns its loss/accuracy history."""
    x_train = data[0]
    model = btnnx.convert(GRUClassifier(x_train.shape[-1], args.hidden, rngs=nnx.Rngs(args.seed)))
    learner = btnnx.compile(
        model,
        common.last_step_cross_entropy,
        bt.algorithm_by_name(algorithm, decay_or_rank=args.decay),
    )
    h0 = jnp.zeros((args.batch_size, args.hidden), jnp.float32)
    x0 = jnp.zeros((args.batch_size, x_train.shape[-1]), jnp.float32)
    if args.verbose:
        tqdm.write(str(learner.report(model, h0, x0)))  # how every Param is trained
    tx = common.digits_adam(args, len(x_train))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def update(model, optimizer, xs, targets):
        # Fresh zero hidden state and zero traces for every batch of new sequences.
        state = learner.init(model, h0, xs[0])
        (losses, _), grads, _ = learner.scan(model, state, xs, targets)
        optimizer.update(model, grads)
        return losses.sum()

    def fit_step(carry, xs, targets):
        # NNX objects update in place: the carry stays the same (model, optimizer).
        return carry, update(*carry, xs, targets)

    _, history = common.fit_digits(
        fit_step,
        lambda carry, x, y: accuracy(carry[0], x, y),
        (model, optimizer),
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
    title = "Flax NNX GRU on sequential digits"
    return common.run_digits_job("nnx_gru_digits", title, train, args)


if __name__ == "__main__":
    main()
