"""The learner's argument checks: clear braintrace errors before the user's step runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Algorithm, LearnerState

__all__ = [
    "check_algorithm",
    "check_state",
    "check_batch",
    "batch_shape",
    "check_traces",
    "check_mask",
    "fresh_state",
    "check_scalar",
    "check_loss_batch",
    "check_time_major",
    "check_window",
    "check_active",
    "signature",
]

_WHO = "braintrace learner"


def check_algorithm(algorithm, who: str) -> None:
    """``algorithm`` must be an :class:`Algorithm` instance (not the class)."""
    if isinstance(algorithm, type) and issubclass(algorithm, Algorithm):
        raise TypeError(
            f"{who}: pass an algorithm instance, e.g. {algorithm.__name__}(), not the class."
        )
    if not isinstance(algorithm, Algorithm):
        raise TypeError(
            f"{who}: algorithm must be braintrace.D_RTRL(), braintrace.ES_D_RTRL(...) / "
            "pp_prop(...), braintrace.SnAp1(), braintrace.RTRL(), braintrace.UORO(), "
            f"braintrace.OneStep() or braintrace.BPTT(); got {algorithm!r}."
        )


def check_state(state) -> None:
    if not isinstance(state, LearnerState):
        raise TypeError(
            f"{_WHO}: state must be the LearnerState returned by learner.init(...) or "
            f"learner.step(...), got {type(state).__name__}."
        )


def _leading(tree) -> set:
    return {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree_util.tree_leaves(tree)}


def batch_shape(batched: bool, hidden) -> tuple:
    """Shape of the per-sample counter: ``(B,)`` when batched, ``()`` otherwise."""
    if not batched:
        return ()
    sizes = _leading(hidden) - {None}
    return (min(sizes),) if sizes else ()


def check_batch(batched: bool, hidden, x, count, where: str) -> None:
    """With ``batched=True``: one batch size across ``hidden``, ``x`` and the state."""
    if not batched:
        return
    sizes = {"hidden": _leading(hidden), "x": _leading(x)}
    if count is not None:
        sizes["the state (from learner.init)"] = {jnp.shape(count)[0] if jnp.ndim(count) else None}
    flat = set().union(*sizes.values())
    if len(flat) > 1 or None in flat:
        listed = ", ".join(f"{k}: {sorted(map(str, v))}" for k, v in sizes.items())
        raise ValueError(
            f"{_WHO}.{where} (batched=True): every leaf of hidden and x, and the state, must "
            f"share one leading batch size; got {listed}. A new batch size needs a new "
            "state: call learner.init (or learner.reset) for it."
        )


def check_traces(algorithm: Algorithm, graph, params, state: LearnerState) -> None:
    """The state's traces must be the ones ``algorithm`` keeps for this graph."""
    expected = jax.eval_shape(
        lambda: algorithm.init_traces(graph, jax.tree_util.tree_leaves(params))
    )
    want = [(a.shape, jnp.dtype(a.dtype)) for a in jax.tree_util.tree_leaves(expected)]
    got = [(jnp.shape(a), jnp.result_type(a)) for a in jax.tree_util.tree_leaves(state.traces)]
    same_tree = jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(state.traces)
    if not same_tree or want != got:
        raise ValueError(
            f"{_WHO}: the state's traces do not match {algorithm!r} on this model and these "
            "shapes (a state from another learner, model or batch size?); expected leaves "
            f"{[(tuple(s), d.name) for s, d in want]}, got "
            f"{[(tuple(s), jnp.dtype(d).name) for s, d in got]}. Create the state with this "
            "learner's init."
        )


def check_mask(batched: bool, state: LearnerState, mask) -> jax.Array:
    """``mask`` as a bool array of the state's per-sample shape."""
    mask = jnp.asarray(mask)
    want = jnp.shape(state.count)
    if mask.shape != want:
        kind = f"shape {want} (one flag per sample)" if batched else "a scalar"
        raise ValueError(f"{_WHO}.reset: mask must be {kind}; got shape {mask.shape}.")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{_WHO}.reset: mask must be boolean, got {mask.dtype}.")
    return mask


def fresh_state(state: LearnerState, hidden, algorithm: Algorithm) -> LearnerState:
    """The state every selected sample restarts from: ``hidden`` (or zeros), fresh traces
    (``algorithm.reset_traces``) and a zero count."""
    if hidden is None:
        hidden = jax.tree_util.tree_map(jnp.zeros_like, state.hidden)
    else:
        got, want = (jax.tree_util.tree_structure(t) for t in (hidden, state.hidden))
        shapes = [
            (jnp.shape(a), jnp.shape(b))
            for a, b in zip(
                jax.tree_util.tree_leaves(hidden), jax.tree_util.tree_leaves(state.hidden)
            )
        ]
        if got != want or any(a != b for a, b in shapes):
            raise ValueError(
                f"{_WHO}.reset: hidden must be a pytree like state.hidden (structure {want}, "
                f"same shapes); got {got}."
            )
        hidden = jax.tree_util.tree_map(
            lambda new, old: jnp.asarray(new, jnp.result_type(old)), hidden, state.hidden
        )
    traces = algorithm.reset_traces(state.traces)
    return LearnerState(hidden, traces, jnp.zeros_like(state.count))


def check_scalar(value, what: str, batched: bool = False) -> None:
    shape = tuple(jnp.shape(value))
    per_sample = shape[1:] if batched else shape
    if per_sample != ():
        raise ValueError(
            f"{_WHO}: {what} must return a scalar, got shape {per_sample}. Reduce the "
            "per-sample loss to a scalar (e.g. .sum() or .mean())."
        )


def check_loss_batch(out, target) -> None:
    sizes = _leading((out, target))
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{_WHO} (batched=True): out and target must share one leading batch axis; got "
            f"leading sizes {sorted(map(str, sizes))}. Pass a target with the batch axis first."
        )


def check_time_major(xs, targets) -> int:
    """The shared leading time length of ``xs`` and ``targets``."""
    lengths = _leading((xs, targets))
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"{_WHO}: xs and targets must be time-major with one shared leading time axis; "
            f"got leading sizes {sorted(map(str, lengths))}."
        )
    return lengths.pop()


def check_window(window) -> None:
    """``window`` must be ``None`` or a positive Python int (it sets the program's shape)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"{_WHO}.scan: window must be a positive Python int or None, got {window!r}; it "
            "sets the program's shape, so under jax.jit pass it as a static argument "
            "(static_argnames='window') or close over it."
        )


def check_active(active, count, steps: tuple, where: str):
    """``active`` (or ``None``) as a bool array of shape ``steps + count.shape``."""
    if active is None:
        return None
    active = jnp.asarray(active)
    want = tuple(steps) + tuple(jnp.shape(count))
    if active.shape != want or active.dtype != jnp.bool_:
        what = "time-major (T, B): " if steps else ""
        raise ValueError(
            f"{_WHO}.{where}: active must be a boolean array of shape {want} ({what}one flag "
            f"per sample, False where the step is padding), got {active.dtype}"
            f"{list(active.shape)}. For per-sample lengths: "
            "active = jnp.arange(T)[:, None] < lengths[None, :]."
        )
    return active


def signature(*trees) -> tuple:
    """A hashable key of the trees' structures, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(trees)
    return treedef, tuple((jnp.shape(a), jnp.result_type(a).name) for a in leaves)
