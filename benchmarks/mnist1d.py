"""MNIST-1D: every online algorithm of braintrace on real data, beside the published baselines.

The data
--------
MNIST-1D (Greydanus, 2020; the ``mnist1d`` package, ``pip install -e ".[benchmarks]"``):
ten 1-D digit templates, padded, sheared, scaled, translated and corrupted with
correlated noise, read one value per step (``T = 40``). The standard split (4000
train / 1000 test, seed 42) is generated offline with
``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())`` in a few seconds; the
downloading ``get_dataset`` is never called. Inputs are standardised with the
training set's mean and deviation. Published test accuracies (Greydanus, 2020):
logistic regression 32%, MLP 68%, GRU 91%, CNN 94%.

The models
----------
- ``gru``: a stock ``flax.linen.GRUCell`` (64 units) and a linear readout, compiled
  with ``convert_dense=True`` (what a new user writes). Rows ``bptt``, ``d_rtrl``,
  ``d_rtrl_window10``, ``pp_prop``, ``tbptt10`` (``OneStep`` in windows of 10),
  ``one_step`` and, where ``braintrace.ALGORITHM_NAMES`` has them, ``snap1``, ``uoro``
  and ``rtrl``. RTRL costs ``O(H^2 P)`` per sample and step, so its row uses a
  smaller GRU (``--rtrl-hidden``, 16 units by default): the largest that trains within
  the run's time on 2 CPU cores. Its JSON row says which size it used.
- ``lru``: two :class:`braintrace_flax.ETPLRUCell` layers (32 complex units each,
  eigenvalue magnitudes starting on the ring ``0.5 <= |lambda| <= 0.99``; the first
  with a linear drive from the input, the second with a gated drive), each output
  layer-normalised, and an MLP readout; about as many parameters as the GRU. Rows
  ``lru_bptt``, ``lru_d_rtrl`` and (only when named in ``--rows``, to keep the full run
  within 20 minutes) ``lru_d_rtrl_window10``. Inside each LRU layer
  D-RTRL is exact: the top layer's parameters and the readout get BPTT's gradient,
  the lower layer's are approximate (its state also reaches the top layer, whose
  memory D-RTRL does not trace; ``--verbose`` prints the compile report).

The recipe (the same for every row)
-----------------------------------
Batch 100, Adam with a cosine-decayed rate from ``--lr`` (1e-2), ``--epochs`` (30)
passes, fresh zero state and traces for every batch (``learner.scan`` over the 40
steps, one update per batch). The loss is the cross-entropy of every step's
prediction weighted by ``t / sum(t)`` (``--loss ramp``): later steps, which have seen
more of the sequence, count more. Test accuracy reads the LAST step's prediction.
``--loss last`` puts the whole loss on the last step instead (the recipe the issue
was first measured with; online algorithms then learn from one step per sequence).

What is measured
----------------
Per row: the test accuracy after the last epoch (mean and standard deviation over
``--seeds``; a seed sets the initialisation and the batch order, the split is
fixed), the training seconds per seed (compiles excluded), the trace memory per
sample (``learner.report(...).trace_memory``), and the compiled temp memory of one
update (``learner.scan`` plus Adam: ``memory_analysis().temp_size_in_bytes``). A
table on stdout, a plot (test accuracy per epoch, final accuracies beside the
published baselines) and a JSON last line
``{"benchmark": "mnist1d", "rows": {name: {"test_accuracy", "std", "seconds",
"trace_KiB", "temp_MiB", ...}}, ...}``.

What the full run cuts to fit 20 minutes on 2 CPU cores: the epochs (30 for every
row, with the rate decayed to zero by then), RTRL's width (16 units: at 64 its
``O(H^2 P)`` step would take about 230 times as long) and the LRU's windowed row.
The README's MNIST-1D table holds the measured numbers and the machine.

Run
---
``python benchmarks/mnist1d.py``                       (the default rows, 3 seeds)
``python benchmarks/mnist1d.py --rows bptt d_rtrl``    (some rows)
``python benchmarks/mnist1d.py --quick``               (a smoke run: tiny models, 2 batches)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pathlib
import platform
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import braintrace as bt
import braintrace_flax as btf

CLASSES = 10
STEPS = 40
#: Published test accuracies on MNIST-1D (Greydanus, 2020, "Scaling down deep learning").
PUBLISHED = {"logistic": 0.32, "mlp": 0.68, "gru": 0.91, "cnn": 0.94}
OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"


# -- rows -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: a model, an algorithm by name, a window (``None``: its default)."""

    model: str  # "gru" or "lru"
    algorithm: str  # a name bt.algorithm_by_name accepts
    window: int | None = None
    rtrl_size: bool = False  # the smaller GRU of --rtrl-hidden
    default: bool = True  # run without --rows (False: only when named, to keep 20 minutes)


#: Every row this benchmark knows; :func:`available_rows` keeps those the library has.
ROWS = {
    "bptt": Row("gru", "bptt"),
    "d_rtrl": Row("gru", "d_rtrl"),
    "d_rtrl_window10": Row("gru", "d_rtrl", 10),
    "pp_prop": Row("gru", "pp_prop"),
    "tbptt10": Row("gru", "one_step", 10),
    "one_step": Row("gru", "one_step"),
    "snap1": Row("gru", "snap1"),
    "uoro": Row("gru", "uoro"),
    "rtrl": Row("gru", "rtrl", rtrl_size=True),
    "lru_bptt": Row("lru", "bptt"),
    "lru_d_rtrl": Row("lru", "d_rtrl"),
    "lru_d_rtrl_window10": Row("lru", "d_rtrl", 10, default=False),
}


def available_rows(names=None) -> dict[str, Row]:
    """The rows whose algorithm ``braintrace.ALGORITHM_NAMES`` has, in table order.

    ``names=None``: the default rows (every row but ``lru_d_rtrl_window10``).
    """
    names = [n for n, r in ROWS.items() if r.default] if names is None else list(names)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; this benchmark has {list(ROWS)}.")
    return {n: ROWS[n] for n in names if ROWS[n].algorithm in bt.ALGORITHM_NAMES}


# -- data -----------------------------------------------------------------------------------


def mnist1d_data():
    """The ``mnist1d.data`` module of the mnist1d package.

    Run as a script, this file's folder is first on ``sys.path`` and its own name
    (``mnist1d.py``) would shadow the package, so the folder is left out of the search.
    """
    here = pathlib.Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if pathlib.Path(p or os.getcwd()).resolve() != here]
    try:
        return importlib.import_module("mnist1d.data")
    except ImportError as err:
        raise SystemExit(
            'MNIST-1D needs the mnist1d package: pip install -e ".[benchmarks]"'
        ) from err
    finally:
        sys.path[:] = saved


def load_mnist1d():
    """``(x_train, y_train, x_test, y_test)``: the standard split, generated offline.

    ``x`` is ``(N, 40)`` float32, standardised with the training set's statistics.
    """
    generator = mnist1d_data()
    data = generator.make_dataset(generator.get_dataset_args())  # offline, seed 42
    x, x_test = (np.asarray(data[k], np.float32) for k in ("x", "x_test"))
    mean, std = x.mean(), x.std()
    y, y_test = (np.asarray(data[k], np.int32) for k in ("y", "y_test"))
    return (x - mean) / std, y, (x_test - mean) / std, y_test


def step_weights(kind: str, steps: int = STEPS) -> np.ndarray:
    """Per-step loss weights summing to 1: ``t / sum(t)`` (``ramp``) or the last step."""
    if kind == "ramp":
        t = np.arange(1, steps + 1, dtype=np.float32)
        return t / t.sum()
    if kind == "last":
        return np.eye(steps, dtype=np.float32)[-1]
    raise ValueError(f"unknown loss {kind!r}; expected 'ramp' or 'last'.")


def time_major(x: np.ndarray, labels: np.ndarray, weights: np.ndarray):
    """``(N, T)`` sequences and labels to the learner's ``(T, N, 1)`` inputs and targets."""
    xs = jnp.asarray(x.T[:, :, None])
    shape = xs.shape[:2]
    targets = {
        "label": jnp.broadcast_to(jnp.asarray(labels), shape),
        "weight": jnp.broadcast_to(jnp.asarray(weights)[:, None], shape),
    }
    return xs, targets


def cross_entropy(logits, target):
    """Loss of ONE sample at one step: the step's weight times its cross-entropy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target["label"])
    return target["weight"] * ce


# -- models ---------------------------------------------------------------------------------


class GRUClassifier(nn.Module):
    """One step: a stock ``nn.GRUCell`` and a linear readout to class logits."""

    hidden: int

    @nn.compact
    def __call__(self, h, x):
        h, y = nn.GRUCell(self.hidden, name="gru")(h, x)
        return h, nn.Dense(CLASSES, name="readout")(y)

    def zero_carry(self, batch: int):
        return jnp.zeros((batch, self.hidden), jnp.float32)


class LRUClassifier(nn.Module):
    """One step: two LRU layers (the top one with a gated drive) and an MLP readout."""

    hidden: int
    mlp: int = 32

    @nn.compact
    def __call__(self, carry, x):
        low, top = carry
        low, y = btf.ETPLRUCell(self.hidden, name="lru_low")(low, x)  # |lambda| in [0.5, 0.99]
        top, y = btf.ETPLRUCell(self.hidden, gated=True, name="lru_top")(top, y)
        y = nn.gelu(nn.Dense(self.mlp, name="mlp")(y))
        return (low, top), nn.Dense(CLASSES, name="readout")(y)

    def zero_carry(self, batch: int):
        zeros = jnp.zeros((batch, self.hidden), jnp.float32)
        return (zeros, zeros), (zeros, zeros)


def build_model(row: Row, args) -> nn.Module:
    if row.model == "lru":
        return LRUClassifier(args.lru_hidden)
    return GRUClassifier(args.rtrl_hidden if row.rtrl_size else args.hidden)


# -- one row --------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """A row's compiled update and evaluation, shared by its seeds."""

    model: nn.Module
    learner: object
    init_params: object  # seed -> params
    update: object  # compiled (params, opt_state, key, xs, targets) -> (params, opt_state, loss)
    accuracy: object  # jitted (params, xs, labels) -> accuracy of the last step
    optimizer: optax.GradientTransformation
    trace_bytes: int
    temp_bytes: int


def make_runner(row: Row, args, n_train: int, weights: np.ndarray) -> Runner:
    """Compile one row: its learner, its update (``learner.scan`` and Adam) and its eval."""
    model = build_model(row, args)
    algorithm = bt.algorithm_by_name(row.algorithm, decay_or_rank=args.pp_decay)
    learner = btf.compile(model, cross_entropy, algorithm, convert_dense=row.model == "gru")
    carry, x0 = model.zero_carry(args.batch_size), jnp.zeros((args.batch_size, 1))
    init_params = lambda seed: model.init(jax.random.key(seed), carry, x0)["params"]
    per_epoch = batches(n_train, args)
    optimizer = optax.adam(optax.cosine_decay_schedule(args.lr, args.epochs * per_epoch))

    def update(params, opt_state, key, xs, targets):
        state = learner.init(params, carry, xs[0], key=key)  # fresh state and zero traces
        (losses, _), grads, _ = learner.scan(params, state, xs, targets, window=row.window)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses.sum()

    params = init_params(0)
    report = learner.report(params, carry, x0)
    if args.verbose:
        tqdm.write(f"== {row.model} / {row.algorithm} ==\n{report}")
    zeros = np.zeros((args.batch_size, STEPS), np.float32)
    xs, targets = time_major(zeros, np.zeros(args.batch_size, np.int32), weights)
    shapes = (params, optimizer.init(params), jax.random.key(0), xs, targets)
    compiled = jax.jit(update).lower(*shapes).compile()
    step = btf.make_step(model)  # the plain forward pass: no traces needed to evaluate

    @jax.jit
    def accuracy(params, xs, labels):
        _, logits = jax.lax.scan(lambda h, x: step(params, h, x), model.zero_carry(xs.shape[1]), xs)
        return jnp.mean(jnp.argmax(logits[-1], -1) == labels)

    return Runner(
        model,
        learner,
        init_params,
        compiled,
        accuracy,
        optimizer,
        sum(n for _, n in report.trace_memory),
        compiled.memory_analysis().temp_size_in_bytes,
    )


def batches(n_train: int, args) -> int:
    full = n_train // args.batch_size
    return min(full, args.max_batches) if args.max_batches else full


def train_seed(runner: Runner, data, weights, args, seed: int, progress) -> dict:
    """Train one seed of a row; its test accuracy per epoch and its seconds."""
    x, y, x_test, y_test = data
    test_xs = jnp.asarray(x_test.T[:, :, None])
    params = runner.init_params(seed)
    opt_state = runner.optimizer.init(params)
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    history, seconds = [], 0.0
    for epoch in range(args.epochs):
        order = rng.permutation(len(x))
        start = time.perf_counter()
        for i in range(batches(len(x), args)):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            key, sub = jax.random.split(key)
            xs, targets = time_major(x[idx], y[idx], weights)
            params, opt_state, loss = runner.update(params, opt_state, sub, xs, targets)
            progress.update()
        loss = float(loss)  # waits for the epoch's last update
        seconds += time.perf_counter() - start
        history.append(float(runner.accuracy(params, test_xs, jnp.asarray(y_test))))
        progress.set_postfix(seed=seed, epoch=epoch + 1, loss=f"{loss:.3f}", test=history[-1])
    return {"test_acc": history, "seconds": seconds}


def run_row(name: str, row: Row, data, args, progress) -> dict:
    """Every seed of one row: the row's JSON entry plus its per-epoch curves."""
    weights = step_weights(args.loss)
    progress.set_description(name)
    runner = make_runner(row, args, len(data[0]), weights)
    runs = [train_seed(runner, data, weights, args, s, progress) for s in args.seeds]
    final = np.array([r["test_acc"][-1] for r in runs])
    params = runner.init_params(0)
    return {
        "model": row.model,
        "algorithm": row.algorithm,
        "window": row.window,
        "hidden": runner.model.hidden,
        "params": int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
        "test_accuracy": round(float(final.mean()), 4),
        "std": round(float(final.std()), 4),
        "accuracies": [round(float(a), 4) for a in final],
        "seconds": round(float(np.mean([r["seconds"] for r in runs])), 1),
        "trace_KiB": round(runner.trace_bytes / 1024, 2),
        "temp_MiB": round(runner.temp_bytes / 2**20, 3),
        "curve": [round(float(a), 4) for a in np.mean([r["test_acc"] for r in runs], 0)],
    }


# -- output ---------------------------------------------------------------------------------


def print_table(results: dict) -> None:
    head = f"{'row':<21}{'test acc':>14}{'s/seed':>8}{'trace KiB':>11}{'temp MiB':>10}{'params':>8}"
    print(head)
    for name, r in results.items():
        acc = f"{r['test_accuracy']:.3f}+-{r['std']:.3f}"
        print(
            f"{name:<21}{acc:>14}{r['seconds']:>8.1f}{r['trace_KiB']:>11.1f}"
            f"{r['temp_MiB']:>10.2f}{r['params']:>8}"
        )
    print("published: " + ", ".join(f"{k} {v:.2f}" for k, v in PUBLISHED.items()))


def plot(results: dict, path: pathlib.Path, title: str) -> None:
    """Mean test accuracy per epoch, and the final accuracies beside the published ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(13, 5))
    palette = plt.get_cmap("tab20").colors
    for k, (name, r) in enumerate(results.items()):
        epochs = np.arange(1, len(r["curve"]) + 1)
        style = "--" if r["model"] == "lru" else "-"
        color = palette[(2 * k + k // 10) % 20]  # the strong colours, then the light ones
        ax_curve.plot(epochs, r["curve"], style, color=color, label=name)
    names = list(results)
    means = [results[n]["test_accuracy"] for n in names]
    colors = ["tab:orange" if results[n]["model"] == "lru" else "tab:blue" for n in names]
    ax_bar.barh(names, means, xerr=[results[n]["std"] for n in names], color=colors)
    for y, mean in enumerate(means):
        ax_bar.text(0.01, y, f"{mean:.3f}", va="center", color="white", fontsize=8)
    for ax, orient in ((ax_curve, "h"), (ax_bar, "v")):
        for k, (label, acc) in enumerate(PUBLISHED.items()):
            line = ax.axhline if orient == "h" else ax.axvline
            line(acc, color=f"C{k + 3}", ls=":", lw=1, label=f"published {label} ({acc:.2f})")
    ax_curve.set(xlabel="epoch", ylabel="test accuracy (mean over seeds)", ylim=(0, 1))
    ax_bar.set(xlabel="final test accuracy (mean, std over seeds)", xlim=(0, 1))
    ax_bar.invert_yaxis()
    ax_curve.legend(fontsize=7, ncol=2)
    ax_bar.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """The CPU's model name and core count (Linux), or what ``platform`` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, JAX {jax.default_backend()}"


# -- command line ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="rows to run")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row")
    p.add_argument("--batch-size", type=int, default=100, help="sequences per update")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam's peak rate (cosine decay)")
    p.add_argument("--loss", choices=("ramp", "last"), default="ramp", help="per-step loss")
    p.add_argument("--hidden", type=int, default=64, help="GRU units")
    p.add_argument("--rtrl-hidden", type=int, default=16, help="GRU units of the rtrl row")
    p.add_argument("--lru-hidden", type=int, default=32, help="complex units per LRU layer")
    p.add_argument("--pp-decay", type=float, default=0.9, help="pp_prop's trace decay")
    p.add_argument("--max-batches", type=int, default=0, help="cap batches per epoch (0: all)")
    p.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="directory for the plot")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 batches")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print each row's compile report")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_batches, args.seeds = 2, 2, [0, 1]
        args.hidden, args.rtrl_hidden, args.lru_hidden = 8, 4, 4
    if min(args.epochs, args.batch_size, args.hidden, args.rtrl_hidden, args.lru_hidden) < 1:
        p.error("--epochs, --batch-size and the sizes must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_mnist1d()
    rows = available_rows(args.rows)
    total = len(rows) * len(args.seeds) * args.epochs * batches(len(data[0]), args)
    results = {}
    with tqdm(total=total, unit="update", disable=args.quiet) as progress:
        for name, row in rows.items():
            results[name] = run_row(name, row, data, args, progress)
    print_table(results)
    path = None
    if not args.no_plot:
        path = args.out / f"mnist1d{'_quick' if args.quick else ''}.png"
        title = f"MNIST-1D, {args.epochs} epochs, seeds {args.seeds}, loss {args.loss}"
        plot(results, path, title)
        print(f"plot: {path}")
    summary = {
        "benchmark": "mnist1d",
        "rows": results,
        "published": PUBLISHED,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": args.loss,
        "seeds": args.seeds,
        "machine": machine(),
        "total_seconds": round(time.perf_counter() - start, 1),
        "plot": None if path is None else str(path),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
