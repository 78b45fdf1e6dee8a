"""A character-level language model learns online from one pass over a real text stream.

The text
--------
The Python documentation that ships with every CPython, ``pydoc_data.topics.topics``
(79 topics joined with blank lines: about 465,000 characters, 103 distinct; a
unigram model needs 4.69 bits per character). The first 90% is the training stream,
the last 10% is held out. The training stream is cut into ``--streams`` contiguous
pieces read side by side (a batch of streams): each update sees the next character
(or the next window of characters) of every piece, and no character is seen twice.

The model
---------
A stock ``flax.linen.GRUCell`` (``--hidden`` units) compiled with
``convert_dense=True``, reading each character one-hot: the GRU's input kernels are
ETP dense ops on the one-hot vector (the embedding is the input kernel, so it is
traced like the rest of the cell), and a linear readout gives the next character's
logits. The hidden state is carried across updates and never reset: the text is one
stream.

The rows (one run each, the same initialisation and stream)
-----------------------------------------------------------
- ``tbptt``          truncated BPTT in windows of ``--window`` steps (``OneStep``
                     windows): the memory-matched baseline, one update per window;
- ``d_rtrl``         D-RTRL, one update per character;
- ``d_rtrl_window``  D-RTRL in windows of ``--window`` steps, one update per window;
- ``pp_prop``        pp_prop (ES-D-RTRL), one update per character;
- ``bptt_full``      BPTT over chunks of ``--long-window`` steps, one update per chunk:
                     a reference with more memory (the chunk's activations), not an
                     online method.

Every row uses Adam at ``--lr * sqrt(steps per update)`` (3e-3 per character, about
1e-2 per window of 10, 3e-2 per chunk of 100): a window's update averages ``k`` times
as many characters and the stream gives it ``k`` times fewer updates, and the square
root is Adam's usual batch-size rule (``--same-lr`` turns it off). One pass over the
stream gives the chunked reference only 130 updates, so it ends behind the online
rows: online learning's advantage on a stream is also the number of updates it gets
from each character.

Per row: the held-out bits per character after the pass (the plain model run over the
held-out text, cut into 16 pieces read from a zero state), the training seconds
(compiles excluded) and the compiled temp memory of one update. The plot shows the
held-out bpc against the characters seen; the last stdout line is
``{"example": "char_stream", "rows": {name: {"bpc", "seconds", "temp_MiB", ...}}, ...}``.

Run
---
``python examples/char_stream.py``            (every row; minutes on 2 CPU cores)
``python examples/char_stream.py --rows d_rtrl tbptt``
``python examples/char_stream.py --quick``    (a seconds-long smoke run)
"""

from __future__ import annotations

import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common as common
import braintrace as bt
import braintrace_flax as btf

ROWS = ("tbptt", "d_rtrl", "d_rtrl_window", "pp_prop", "bptt_full")
TEST_PIECES = 16  # the held-out text is read as this many pieces side by side
LN2 = math.log(2.0)


# -- text -----------------------------------------------------------------------------------


def load_text() -> str:
    """The pydoc topics, joined with blank lines, in the dict's order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in topics)


def encode(text: str):
    """``(codes, vocabulary)``: int32 codes of every character and the sorted characters."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.fromiter((index[c] for c in text), np.int32, len(text)), vocab


def split(codes: np.ndarray, held_out: float = 0.1):
    """The training stream (the first ``1 - held_out``) and the held-out tail."""
    cut = int(round(len(codes) * (1.0 - held_out)))
    return codes[:cut], codes[cut:]


def pieces(codes: np.ndarray, n: int) -> np.ndarray:
    """``(L + 1, n)`` time-major: ``n`` contiguous pieces of ``L + 1`` codes side by side.

    Step ``t`` reads row ``t`` and predicts row ``t + 1``; the tail that does not fill a
    piece is dropped.
    """
    length = len(codes) // n
    if length < 2:
        raise ValueError(f"{len(codes)} characters cannot make {n} pieces of 2 or more")
    return np.ascontiguousarray(codes[: n * length].reshape(n, length).T)


def unigram_bpc(train: np.ndarray, test: np.ndarray, vocab_size: int) -> float:
    """Held-out bits per character of the training text's unigram frequencies (add-one)."""
    counts = np.bincount(train, minlength=vocab_size) + 1.0
    return float(-np.mean(np.log2(counts / counts.sum())[test]))


# -- model and loss -------------------------------------------------------------------------


class CharGRU(nn.Module):
    """One step: a stock GRU over the one-hot character, then next-character logits."""

    hidden: int
    vocab: int

    @nn.compact
    def __call__(self, h, code):
        x = jax.nn.one_hot(code, self.vocab)  # the input kernels are ETP ops on it
        h, y = nn.GRUCell(self.hidden, name="gru")(h, x)
        return h, nn.Dense(self.vocab, name="readout")(y)


def cross_entropy(logits, target):
    """Loss of ONE sample at one step, in nats."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, target)


def method(name: str, args) -> tuple[bt.Algorithm, int]:
    """``(algorithm, steps per update)`` of a row."""
    return {
        "tbptt": (bt.OneStep(), args.window),
        "d_rtrl": (bt.D_RTRL(), 1),
        "d_rtrl_window": (bt.D_RTRL(), args.window),
        "pp_prop": (bt.pp_prop(args.pp_decay), 1),
        "bptt_full": (bt.BPTT(), args.long_window),
    }[name]


# -- training -------------------------------------------------------------------------------


def make_update(learner, optimizer, steps: int):
    """One update: ``steps`` characters of every piece (one step, or one window), then Adam.

    ``update((params, opt_state, state), (xs, ys)) -> (carry, mean loss in nats)`` with
    time-major ``(steps, pieces)`` codes; the learner's state (hidden, traces) carries on.
    """

    def update(carry, chunk):
        params, opt_state, state = carry
        xs, ys = chunk
        if steps == 1:
            (loss, _), grads, state = learner.step(params, state, xs[0], ys[0])
        else:
            (losses, _), grads, state = learner.window(params, state, xs, ys)
            loss = losses.mean()
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, state), loss

    return update


def make_segment(update, steps: int, updates: int):
    """``updates`` consecutive updates in one jitted call (fewer dispatches), via ``lax.scan``."""

    @jax.jit
    def segment(carry, codes):  # codes: (updates * steps + 1, pieces)
        xs = codes[:-1].reshape((updates, steps) + codes.shape[1:])
        ys = codes[1:].reshape(xs.shape)
        return jax.lax.scan(update, carry, (xs, ys))

    return segment


def make_evaluate(model: nn.Module, test: np.ndarray):
    """``evaluate(params) -> held-out bpc``: the plain model over the held-out pieces."""
    step = btf.make_step(model)
    codes = jnp.asarray(test)

    @jax.jit
    def evaluate(params):
        h0 = jnp.zeros((codes.shape[1], model.hidden), jnp.float32)
        _, logits = jax.lax.scan(lambda h, x: step(params, h, x), h0, codes[:-1])
        return jnp.mean(jax.vmap(jax.vmap(cross_entropy))(logits, codes[1:])) / LN2

    return evaluate


def row_lr(args, steps: int) -> float:
    """Adam's rate for updates of ``steps`` characters per piece: ``--lr * sqrt(steps)``.

    An update of a ``k``-step window averages ``k`` times as many characters as a
    per-step update, and gets ``k`` times fewer updates from the same stream; Adam's
    usual batch-size rule scales its rate with the square root (``--same-lr``: no
    scaling).
    """
    return args.lr if args.same_lr else args.lr * math.sqrt(steps)


def plan(length: int, steps: int, args) -> tuple[int, int]:
    """``(segments, updates per segment)`` covering a piece of ``length`` characters once.

    A segment is one jitted call of equal length (it compiles once) dividing the
    ``(length - 1) // steps`` updates; there are at least ``--evals`` segments, so the
    held-out evaluations (between segments) are spread over the whole stream.
    """
    total = (length - 1) // steps
    cap = max(1, min(args.updates_per_call, total // args.evals))
    per_segment = max(d for d in range(1, cap + 1) if total % d == 0)  # no update left out
    return total // per_segment, per_segment


def train(name: str, model, stream: np.ndarray, evaluate, args, progress) -> dict:
    """One row over the whole stream: held-out bpc along the way, seconds, temp memory."""
    algorithm, steps = method(name, args)
    learner = btf.compile(model, cross_entropy, algorithm, convert_dense=True)
    h0 = jnp.zeros((stream.shape[1], args.hidden), jnp.float32)
    params = model.init(jax.random.key(args.seed), h0, jnp.zeros(stream.shape[1], jnp.int32))
    params = params["params"]
    optimizer = optax.adam(row_lr(args, steps))
    carry = (params, optimizer.init(params), learner.init(params, h0, jnp.asarray(stream[0])))
    if args.verbose:
        print(learner.report(params, h0, jnp.asarray(stream[0])))
    update = make_update(learner, optimizer, steps)
    one = jax.ShapeDtypeStruct((steps, stream.shape[1]), jnp.int32)
    temp = jax.jit(update).lower(carry, (one, one)).compile().memory_analysis()
    segments, per_segment = plan(len(stream), steps, args)
    segment = make_segment(update, steps, per_segment)
    width = per_segment * steps
    evals = set(np.linspace(0, segments, min(args.evals, segments) + 1).astype(int)[1:])
    history = {"seen": [0], "bpc": [float(evaluate(params))], "train_bpc": []}
    segment.lower(carry, jnp.asarray(stream[: width + 1])).compile()  # compile off the clock
    seconds, losses = 0.0, []
    for s in range(segments):
        codes = jnp.asarray(stream[s * width : (s + 1) * width + 1])
        start = time.perf_counter()
        carry, loss = segment(carry, codes)
        losses.append(np.asarray(loss))  # waits for the segment
        seconds += time.perf_counter() - start
        progress.update(per_segment)
        if s + 1 in evals:
            history["seen"].append((s + 1) * width * stream.shape[1])
            history["bpc"].append(float(evaluate(carry[0])))
            history["train_bpc"].append(float(np.concatenate(losses).mean() / LN2))
            progress.set_postfix(row=name, bpc=f"{history['bpc'][-1]:.3f}")
            losses = []
    history.update(seconds=seconds, temp_MiB=temp.temp_size_in_bytes / 2**20)
    history.update(updates=segments * per_segment, steps_per_update=steps, lr=row_lr(args, steps))
    return history


# -- plot and summary -----------------------------------------------------------------------


def plot(histories: dict, path, title: str, unigram: float) -> None:
    """Held-out bpc against the characters seen, one line per row."""
    if path is None:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, h in histories.items():
        ax.plot(h["seen"], h["bpc"], "o-", ms=3, label=name)
    ax.axhline(unigram, color="gray", ls=":", label=f"unigram ({unigram:.2f})")
    ax.set(xlabel="training characters seen", ylabel="held-out bits per character", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(histories: dict, args, sizes: dict, path, total: float) -> dict:
    rows = {
        name: {
            "bpc": round(h["bpc"][-1], 4),
            "seconds": round(h["seconds"], 1),
            "temp_MiB": round(h["temp_MiB"], 3),
            "train_bpc": round(h["train_bpc"][-1], 4),
            "updates": h["updates"],
            "steps_per_update": h["steps_per_update"],
            "lr": round(h["lr"], 6),
        }
        for name, h in histories.items()
    }
    return {
        "example": "char_stream",
        "rows": rows,
        **sizes,
        "hidden": args.hidden,
        "streams": args.streams,
        "window": args.window,
        "long_window": args.long_window,
        "lr": args.lr,
        "seed": args.seed,
        "total_seconds": round(total, 1),
        "plot": None if path is None else str(path),
    }


# -- command line ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run")
    p.add_argument("--hidden", type=int, default=128, help="GRU units")
    p.add_argument("--streams", type=int, default=32, help="pieces of the text read side by side")
    p.add_argument("--window", type=int, default=10, help="steps per update (tbptt, d_rtrl_window)")
    p.add_argument("--long-window", type=int, default=100, help="steps per update (bptt_full)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's rate for per-step updates")
    p.add_argument(
        "--same-lr", action="store_true", help="no sqrt(steps per update) scaling of --lr"
    )
    p.add_argument("--pp-decay", type=float, default=0.9, help="pp_prop's trace decay")
    p.add_argument("--evals", type=int, default=10, help="held-out evaluations per row")
    p.add_argument(
        "--updates-per-call", type=int, default=64, help="updates per jitted call (dispatch)"
    )
    p.add_argument("--max-chars", type=int, default=0, help="use only the text's first N (0: all)")
    common.add_run_flags(
        p, quick_help="smoke run: 20,000 characters, a small GRU", verbose_help="compile reports"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.max_chars, args.hidden, args.streams, args.evals = 20_000, 16, 8, 2
        args.long_window = 4 * args.window
    if min(args.hidden, args.streams, args.window, args.long_window, args.evals) < 1:
        p.error("--hidden, --streams, --window, --long-window and --evals must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    text = load_text()
    codes, vocab = encode(text[: args.max_chars] if args.max_chars else text)
    train_codes, test_codes = split(codes)
    stream, test = pieces(train_codes, args.streams), pieces(test_codes, TEST_PIECES)
    model = CharGRU(args.hidden, len(vocab))
    evaluate = make_evaluate(model, test)
    total = sum(plan(len(stream), method(n, args)[1], args)[0] for n in args.rows)
    histories = {}
    with common.progress(total * args.updates_per_call, "update", quiet=args.quiet) as bar:
        for name in args.rows:
            histories[name] = train(name, model, stream, evaluate, args, bar)
    unigram = unigram_bpc(train_codes, test_codes, len(vocab))
    path = common.plot_path(args, "char_stream")
    plot(histories, path, f"{args.hidden}-unit GRU, one pass, {args.streams} streams", unigram)
    print(f"{'row':<15}{'held-out bpc':>13}{'seconds':>9}{'temp MiB':>10}{'updates':>9}")
    for name, h in histories.items():
        print(
            f"{name:<15}{h['bpc'][-1]:>13.3f}{h['seconds']:>9.1f}{h['temp_MiB']:>10.2f}"
            f"{h['updates']:>9}"
        )
    print(f"unigram {unigram:.3f} bpc; plot: {path}")
    sizes = {"chars_train": int(len(train_codes)), "chars_test": int(len(test_codes))}
    sizes.update(vocab=len(vocab), unigram_bpc=round(unigram, 4))
    summary = summarize(histories, args, sizes, path, time.perf_counter() - start)
    return common.print_summary(summary)


if __name__ == "__main__":
    main()
