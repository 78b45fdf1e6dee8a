"""What the example scripts share: minibatches, a progress bar, the training plot and
the sequential-digits task.

The examples run as scripts (``python examples/<name>.py``), so Python puts this
folder on ``sys.path`` and they import this module as ``import _common as common``.

Command line
    :func:`argument_parser` (description from the script's docstring, defaults shown)
    and :func:`add_run_flags` (``--seed``, ``--out``, ``--quick``, ``--verbose``,
    ``--no-plot``, ``--quiet``). Every flag carries help text.
Training loop helpers
    :func:`batches_per_epoch`, :func:`minibatches` (shuffled index arrays of full
    mini-batches, so a jitted update compiles once), :func:`progress` (a tqdm bar,
    silent with ``--quiet``).
Plot
    :func:`plot_path`: where a run's PNG goes (a ``--quick`` run's name ends in
    ``_quick``, so it never overwrites the full run's; ``None`` with ``--no-plot``).
    :func:`plot_training`: training loss per update (smoothed) and accuracy per
    evaluation, one line per run, optionally a third panel drawn by the caller.
    A run's history is a dict with ``"loss"`` (one value per update), ``"eval_at"``
    (the update count at each evaluation), ``"test_acc"`` and optionally
    ``"train_acc"`` (one value per evaluation).
Sequential digits (scikit-learn's 8x8 digits read as a sequence, no download)
    :func:`load_digit_sequences`, :func:`last_step_targets` and
    :func:`last_step_cross_entropy` (the loss counts on the last step only); for a
    GRU classifier on this task (the linen and NNX main jobs) :func:`digits_args`
    (the flags), :func:`fit_digits` (the epoch loop) and :func:`run_digits_job`
    (training every requested algorithm, the plot, the printout and the summary).
Summary
    :func:`print_summary`: the JSON line every example prints last.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Callable, Iterator

import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

DIGIT_CLASSES = 10
OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"  # where the plots go by default
SPLIT_SEED = 0  # one fixed train/test split: an example's --seed changes init and order only


# -- command line -------------------------------------------------------------------------


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc`` (defaults in ``--help``)."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_run_flags(
    parser: argparse.ArgumentParser, *, quick_help: str, verbose_help: str, plot: bool = True
) -> None:
    """The flags every example has: ``--seed``, ``--quick``, ``--verbose`` and ``--quiet``;
    with ``plot``, ``--out`` and ``--no-plot`` too."""
    parser.add_argument("--seed", type=int, default=0, help="seed for init and data order")
    if plot:
        parser.add_argument(
            "--out", type=pathlib.Path, default=OUT_DIR, help="directory for the PNG plot"
        )
        parser.add_argument(
            "--no-plot", action="store_true", help="write no PNG (the JSON summary's plot is null)"
        )
    parser.add_argument(
        "--quick", action="store_true", help=quick_help + " (its plot gets a name of its own)"
    )
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (the results and the JSON summary line are still printed)",
    )


# -- training loop ------------------------------------------------------------------------


def batches_per_epoch(n: int, batch_size: int, max_batches: int = 0) -> int:
    """Full mini-batches of ``batch_size`` in ``n`` examples, at most ``max_batches`` (0: all)."""
    full = n // batch_size
    return min(full, max_batches) if max_batches else full


def minibatches(
    n: int, batch_size: int, rng: np.random.Generator, max_batches: int = 0
) -> Iterator[np.ndarray]:
    """Index arrays of one epoch's shuffled full mini-batches (fixed shape: jit compiles once)."""
    order = rng.permutation(n)
    for i in range(batches_per_epoch(n, batch_size, max_batches)):
        yield order[i * batch_size : (i + 1) * batch_size]


def progress(total: int, unit: str = "batch", quiet: bool = False) -> tqdm:
    """A progress bar over ``total`` updates (use it as a context manager); with
    ``quiet`` it draws nothing (its ``update`` and ``set_postfix`` still work)."""
    return tqdm(total=total, unit=unit, disable=quiet)


def print_summary(summary: dict) -> dict:
    """Print ``summary`` as the example's last stdout line (JSON) and return it."""
    print(json.dumps(summary))
    return summary


# -- plot -----------------------------------------------------------------------------------


def plot_path(args: argparse.Namespace, stem: str) -> pathlib.Path | None:
    """The PNG of this run: ``OUT/<stem>.png``, ``OUT/<stem>_quick.png`` for a ``--quick``
    run (a smoke run never overwrites the full run's plot), ``None`` with ``--no-plot``."""
    if args.no_plot:
        return None
    return args.out / f"{stem}{'_quick' if args.quick else ''}.png"


def smooth(values, width: int) -> np.ndarray:
    """Moving average over ``width`` values (the per-batch loss is noisy)."""
    width = max(1, min(width, len(values)))
    return np.convolve(np.asarray(values, float), np.ones(width) / width, mode="valid")


def plot_training(
    histories: dict,
    path: pathlib.Path | None,
    title: str,
    *,
    chance: float,
    loss_label: str = "loss",
    log_loss: bool = True,
    ideal: float | None = None,
    extra: Callable | None = None,
) -> pathlib.Path:
    """Save a PNG: smoothed loss per update and accuracy per evaluation, one line per run.

    Parameters
    ----------
    histories : dict
        ``{run name: history}`` (see the module docstring for a history's keys).
    path : pathlib.Path or None
        Where to write the PNG (parent folders are created); ``None`` writes nothing.
    title : str
        The figure's title.
    chance, ideal : float
        Horizontal reference lines on the accuracy panel (``ideal`` is optional).
    loss_label : str
        The loss axis' label.
    log_loss : bool
        Plot the loss on a log scale.
    extra : callable, optional
        ``extra(ax)`` draws a third panel.
    """
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if extra else 2, figsize=(15 if extra else 11, 4))
    ax_loss, ax_acc = axes[:2]
    for name, h in histories.items():
        width = max(1, len(h["loss"]) // 50)
        ax_loss.plot(np.arange(width, len(h["loss"]) + 1), smooth(h["loss"], width), label=name)
        (line,) = ax_acc.plot(h["eval_at"], h["test_acc"], "o-", ms=3, label=f"{name} test")
        if "train_acc" in h:
            ax_acc.plot(
                h["eval_at"], h["train_acc"], "--", color=line.get_color(), label=f"{name} train"
            )
    ax_acc.axhline(chance, color="gray", lw=0.8, ls=":", label="chance")
    if ideal is not None:
        ax_acc.axhline(ideal, color="black", ls="--", label="ideal observer")
    ax_loss.set(xlabel="update", ylabel=loss_label, title="training loss (smoothed)")
    if log_loss:
        ax_loss.set_yscale("log")
    ax_acc.set(xlabel="update", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    if extra:
        extra(axes[2])
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the sequential-digits task ---------------------------------------------------------------


def load_digit_sequences(chunk: int = 8):
    """8x8 digits as sequences of ``chunk`` pixels in reading order (``T = 64 // chunk``).

    Returns ``x_train, x_test, y_train, y_test`` with ``x`` of shape ``(N, T, chunk)``
    in ``[0, 1]`` (float32) and int32 labels: a stratified 80/20 split, fixed seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if chunk < 1 or 64 % chunk:
        raise ValueError(f"chunk must divide 64 (the pixels of an image), got {chunk}")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 64 // chunk, chunk)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.2, random_state=SPLIT_SEED, stratify=y)


def last_step_targets(x: np.ndarray, y: np.ndarray):
    """Batch-major ``(B, T, C)`` inputs and ``(B,)`` labels to the learner's time-major form.

    The target of every step is ``{"label", "weight"}``; the weight is 1 on the last
    step and 0 before it, which is how :func:`last_step_cross_entropy` counts only the
    last step.
    """
    xs = jnp.asarray(np.swapaxes(x, 0, 1))  # (T, B, C)
    t, b = xs.shape[:2]
    weight = jnp.zeros((t, b), jnp.float32).at[-1].set(1.0)
    return xs, {"label": jnp.broadcast_to(jnp.asarray(y), (t, b)), "weight": weight}


def last_step_cross_entropy(logits, target):
    """Loss of ONE sample at one step (the learner vmaps it and averages the batch)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target["label"])
    return target["weight"] * ce


# -- a GRU classifier job on the sequential digits -------------------------------------------


def digits_args(doc: str, argv, algorithms) -> argparse.Namespace:
    """The flags of a digits job (``--algorithm``, ``--compare``, sizes, rates, run flags)."""
    p = argument_parser(doc)
    p.add_argument(
        "--algorithm", choices=algorithms, default="d_rtrl", help="how gradients are computed"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also train with BPTT and plot both (about twice the time)",
    )
    p.add_argument("--epochs", type=int, default=40, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per update")
    p.add_argument("--hidden", type=int, default=128, help="GRU units")
    p.add_argument(
        "--chunk",
        type=int,
        default=2,
        help="pixels per time step (2: T=32 steps; 8: one row per step, T=8)",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="Adam peak learning rate")
    p.add_argument("--decay", type=float, default=0.9, help="pp_prop's trace decay")
    p.add_argument("--max-batches", type=int, default=0, help="cap batches per epoch (0: all)")
    add_run_flags(
        p,
        quick_help="smoke run: 2 epochs of 3 batches, a small GRU",
        verbose_help="print the compile report",
    )
    args = p.parse_args(argv)
    if args.chunk < 1 or 64 % args.chunk:
        p.error(f"--chunk must divide 64 (the pixels of an image), got {args.chunk}")
    if args.quick:
        args.epochs, args.max_batches, args.hidden = 2, 3, 16
    return args


def digits_adam(args, n_train: int) -> optax.GradientTransformation:
    """Adam with a cosine-decayed rate over the job's updates.

    Large steps early, small ones late, so the last epoch's accuracy is not at the
    mercy of one noisy mini-batch.
    """
    per_epoch = batches_per_epoch(n_train, args.batch_size, args.max_batches)
    return optax.adam(optax.cosine_decay_schedule(args.lr, args.epochs * per_epoch))


def fit_digits(update: Callable, accuracy: Callable, state, data, args, progress, label: str):
    """The epoch loop of a digits job: one ``update`` per mini-batch, accuracies per epoch.

    ``update(state, xs, targets) -> (state, loss)`` trains on one time-major batch
    (``state`` is whatever the job carries: params and optimizer state, or an NNX
    model and optimizer); ``accuracy(state, x, y)`` scores time-major sequences.
    Returns the final ``state`` and the run's history.
    """
    x_train, x_test, y_train, y_test = data
    test_x, test_y = jnp.asarray(np.swapaxes(x_test, 0, 1)), jnp.asarray(y_test)
    train_x, train_y = jnp.asarray(np.swapaxes(x_train, 0, 1)), jnp.asarray(y_train)
    history = {"loss": [], "eval_at": [], "train_acc": [], "test_acc": []}
    rng = np.random.default_rng(args.seed)
    progress.set_description(label)
    for epoch in range(1, args.epochs + 1):
        for idx in minibatches(len(x_train), args.batch_size, rng, args.max_batches):
            state, loss = update(state, *last_step_targets(x_train[idx], y_train[idx]))
            history["loss"].append(float(loss))
            progress.update()
            progress.set_postfix(epoch=epoch, loss=f"{history['loss'][-1]:.3f}")
        history["eval_at"].append(len(history["loss"]))
        history["train_acc"].append(float(accuracy(state, train_x, train_y)))
        history["test_acc"].append(float(accuracy(state, test_x, test_y)))
        progress.set_postfix(epoch=epoch, test_acc=f"{history['test_acc'][-1]:.3f}")
    return state, history


def run_digits_job(example: str, title: str, train: Callable, args) -> dict:
    """Train ``args.algorithm`` (and BPTT with ``--compare``), plot, print, summarise.

    ``train(algorithm, data, args, progress) -> history`` trains one model. Returns
    the summary dict, printed as the last stdout line.
    """
    start = time.perf_counter()
    data = load_digit_sequences(args.chunk)
    names = [args.algorithm] + (["bptt"] if args.compare and args.algorithm != "bptt" else [])
    per_epoch = batches_per_epoch(len(data[0]), args.batch_size, args.max_batches)
    histories, seconds = {}, {}
    with progress(len(names) * args.epochs * per_epoch, quiet=args.quiet) as bar:
        for name in names:
            t0 = time.perf_counter()
            histories[name] = train(name, data, args, bar)
            seconds[name] = round(time.perf_counter() - t0, 1)
    steps = 64 // args.chunk
    png = plot_path(args, f"{example}_{'_vs_'.join(names)}")
    plot_training(
        histories,
        png,
        f"{title} (T={steps}, {args.hidden} units)",
        chance=1 / DIGIT_CLASSES,
        loss_label="last-step cross-entropy",
    )
    for name, h in histories.items():
        print(
            f"{name:8s} test accuracy {h['test_acc'][-1]:.3f} "
            f"(train {h['train_acc'][-1]:.3f}) in {seconds[name]:.1f} s"
        )
    print(f"plot: {png}" if png else "plot: none (--no-plot)")
    main = histories[args.algorithm]
    summary = {
        "example": example,
        "algorithm": args.algorithm,
        "test_accuracy": round(main["test_acc"][-1], 4),
        "train_accuracy": round(main["train_acc"][-1], 4),
        "chance": 1 / DIGIT_CLASSES,
        "epochs": args.epochs,
        "steps_per_sequence": steps,
        "hidden": args.hidden,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "plot": str(png) if png else None,
    }
    if "bptt" in histories and args.algorithm != "bptt":
        summary["bptt_test_accuracy"] = round(histories["bptt"]["test_acc"][-1], 4)
    return print_summary(summary)
