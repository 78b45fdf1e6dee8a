"""Data parallel training over devices with ``jax.sharding``.

A batched learner (``bt.compile(..., batched=True)``) keeps everything per sample on
a leading batch axis: the hidden state, the eligibility traces and the update count.
Only the parameters and the gradient (the batch mean) are shared. So data
parallelism is a matter of placement: split the batch axis of the data and of the
:class:`~braintrace.LearnerState` over the devices of a mesh axis, replicate the
parameters, and every device propagates the traces of its own samples.

Two routes, with the same results as one device (up to the order of the sums):

- :func:`data_parallel` wraps ``learner.step``, ``learner.window`` or
  ``learner.scan`` in :func:`jax.shard_map`: each device runs the learner on its
  slice of the batch and the loss and the gradient are averaged over the devices
  (one all-reduce per call). Nothing per sample ever leaves its device.
- Plain ``jax.jit(learner.step)`` on arguments placed by :func:`replicate`,
  :func:`shard_state` and :func:`shard_batch`: XLA's SPMD partitioner follows the
  placement and inserts the cross-device reduction of the gradient itself. Trace it
  inside ``with jax.set_mesh(mesh):`` so the step sees the mesh. Inside a jitted
  function the same helpers constrain the traced values instead of placing them:
  pass a state made there (``learner.reset(state)`` builds fresh zeros, which XLA
  would otherwise keep whole on every device) through :func:`shard_state`.

Both run unchanged on one device, on several, and on several hosts: after
``jax.distributed.initialize()`` every process passes its own part of the batch
(process-local data) to :func:`shard_state` and :func:`shard_batch`, which assemble
the global arrays with :func:`jax.make_array_from_process_local_data`.

Examples
--------
>>> import jax, jax.numpy as jnp, braintrace as bt
>>> from braintrace import parallel
>>> from braintrace.testing import models
>>> learner = bt.compile(models.lif_step, models.mse, bt.D_RTRL(), batched=True)
>>> mesh = parallel.batch_mesh()                       # every visible device
>>> batch = 2 * mesh.size                               # a multiple of the devices
>>> params = parallel.replicate(models.lif_params(seed=0), mesh)
>>> hidden = models.hidden_like(("i", "v"), lead=(batch,))
>>> xs = jnp.ones((5, batch, models.N_IN))             # time-major: (T, B, n_in)
>>> targets = jnp.zeros((5, batch, 2))
>>> state = parallel.shard_state(learner.init(params, hidden, xs[0]), mesh)
>>> xs, targets = parallel.shard_batch((xs, targets), mesh, time_major=True)
>>> scan = jax.jit(parallel.data_parallel(learner.scan, mesh))
>>> (losses, outs), grads, state = scan(params, state, xs, targets)
>>> losses.shape, outs.shape == (5, batch, 2), state.count.shape == (batch,)
((5,), True, True)
>>> trace = state.traces.relations[0][0]["weight"]    # (B, n_in, n): per sample
>>> [s.data.shape[0] for s in trace.addressable_shards] == [2] * mesh.size
True
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .algorithms import Learner, LearnerState
from .algorithms.face import FaceLearner

__all__ = ["batch_mesh", "replicate", "shard_batch", "shard_state", "data_parallel"]

_METHODS = ("step", "window", "scan")


def batch_mesh(devices=None, axis: str = "batch") -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process).

    The axis is of type ``Auto``: XLA's partitioner propagates the placement through
    the learner. (Under ``Explicit`` axes JAX type-checks the sharding of every
    operation, and rejects the learner's slices and contractions over the batch axis.)

    Parameters
    ----------
    devices : sequence of jax.Device, optional
        The devices, in mesh order (default: ``jax.devices()``).
    axis : str
        The mesh axis' name.

    Returns
    -------
    jax.sharding.Mesh

    Examples
    --------
    >>> import jax
    >>> mesh = batch_mesh()
    >>> mesh.axis_names, mesh.size == jax.device_count()
    (('batch',), True)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("braintrace.parallel.batch_mesh: got no devices.")
    return jax.make_mesh((len(devices),), (axis,), (AxisType.Auto,), devices=devices)


def _check_axis(mesh: Mesh, axis: str, where: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(
            f"braintrace.parallel.{where}: the mesh has no axis {axis!r} (its axes: "
            f"{mesh.axis_names}); pass axis= one of them, or build the mesh with "
            "braintrace.parallel.batch_mesh()."
        )


def _shards(mesh: Mesh, axis: str, leaf) -> int:
    """The slices of ``axis`` that ``leaf`` is split into: all of them for a traced
    (global) array; for process-local data, those held by this process's devices."""
    if isinstance(leaf, jax.core.Tracer):
        return mesh.shape[axis]
    dim = mesh.axis_names.index(axis)
    me = jax.process_index()
    return len({idx[dim] for idx, d in np.ndenumerate(mesh.devices) if d.process_index == me})


def _put(leaf, sharding: NamedSharding):
    """Place a (process-local) array; inside ``jax.jit``, constrain the traced one."""
    if isinstance(leaf, jax.core.Tracer):
        return lax.with_sharding_constraint(leaf, sharding)
    return jax.make_array_from_process_local_data(sharding, leaf)


def replicate(tree, mesh: Mesh):
    """A copy of ``tree`` on every device of ``mesh`` (the parameters, an optimiser state).

    On several hosts every process must pass the same values. Inside ``jax.jit`` it
    constrains the traced values to be replicated.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> params = replicate({"w": jnp.ones((3, 4))}, batch_mesh())
    >>> params["w"].sharding.is_fully_replicated
    True
    """
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda a: _put(a, sharding) if _is_array(a) else a, tree)


def _is_array(leaf) -> bool:
    """An array leaf (a model's other leaves, e.g. an activation function, stay as they are)."""
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _split(tree, mesh: Mesh, axis: str, dim: int, where: str, what: str):
    """Place every leaf of ``tree`` split over ``axis`` along its dimension ``dim``."""
    _check_axis(mesh, axis, where)
    sharding = NamedSharding(mesh, P(*(None,) * dim, axis))

    def place(path, leaf):
        name = f"{what}{jax.tree_util.keystr(path)}"
        shape, n = np.shape(leaf), _shards(mesh, axis, leaf)
        if len(shape) <= dim:
            raise ValueError(
                f"braintrace.parallel.{where}: {name} has shape {shape}, with no batch axis "
                f"at dimension {dim}; every leaf needs one."
            )
        if shape[dim] % n:
            raise ValueError(
                f"braintrace.parallel.{where}: {name} has {shape[dim]} samples on its batch "
                f"axis (dimension {dim}), which do not split evenly over the {n} devices of "
                f"mesh axis {axis!r}; use a batch size that is a multiple of {n}."
            )
        return _put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(place, tree)


def shard_batch(tree, mesh: Mesh, axis: str = "batch", *, time_major: bool = False):
    """Split inputs or targets over the devices of ``axis`` along their batch axis.

    Parameters
    ----------
    tree : pytree of arrays
        Batch-major ``(B, ...)`` leaves (one step's ``x``, ``target``), or time-major
        ``(T, B, ...)`` ones (a sequence for ``window`` or ``scan``). On several hosts:
        this process's part of the batch.
    mesh : jax.sharding.Mesh
    axis : str
        The mesh axis the batch is split over.
    time_major : bool
        Whether the batch axis is the second one (``(T, B, ...)``).

    Returns
    -------
    pytree of jax.Array
        The same values, each device holding a contiguous block of samples. Inside
        ``jax.jit`` the traced values, constrained to that placement
        (:func:`jax.lax.with_sharding_constraint`).

    Raises
    ------
    ValueError
        When a leaf has no batch axis or its batch does not divide the devices.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> xs = shard_batch(jnp.ones((7, 4, 3)), batch_mesh(), time_major=True)
    >>> tuple(xs.sharding.spec)
    (None, 'batch')
    """
    return _split(tree, mesh, axis, 1 if time_major else 0, "shard_batch", "input")


def shard_state(state: LearnerState, mesh: Mesh, axis: str = "batch") -> LearnerState:
    """Split a batched learner's state (hidden, traces, count) over ``axis`` by sample.

    Parameters
    ----------
    state : LearnerState
        From ``learner.init`` of a learner compiled with ``batched=True``: every leaf
        has the leading batch axis. On several hosts: this process's samples.
    mesh : jax.sharding.Mesh
    axis : str
        The mesh axis the batch is split over.

    Returns
    -------
    LearnerState
        Inside ``jax.jit``: the traced state, constrained to that placement (use it
        on a state from ``learner.reset``, whose fresh zeros are otherwise replicated).

    Raises
    ------
    ValueError
        When the state is not batched or its batch does not divide the devices.

    Examples
    --------
    >>> import jax.numpy as jnp, braintrace as bt
    >>> from braintrace.testing import models
    >>> learner = bt.compile(models.rnn_step, models.mse, bt.pp_prop(0.9), batched=True)
    >>> params = models.rnn_params(0)
    >>> state = learner.init(params, jnp.zeros((4, models.N)), jnp.zeros((4, models.N_IN)))
    >>> tuple(shard_state(state, batch_mesh()).count.sharding.spec)
    ('batch',)
    """
    if not isinstance(state, LearnerState):
        raise TypeError(
            f"braintrace.parallel.shard_state: expected a braintrace.LearnerState (from "
            f"learner.init), got {type(state).__name__}."
        )
    if np.ndim(state.count) == 0:
        raise ValueError(
            "braintrace.parallel.shard_state: this state has no batch axis (its count is a "
            "scalar): it comes from an unbatched learner. Compile with "
            "bt.compile(..., batched=True) and give hidden and x a leading batch axis."
        )
    return _split(state, mesh, axis, 0, "shard_state", "state")


def _learner_of(method: Callable, where: str):
    """The learner a bound ``step``/``window``/``scan`` belongs to: a core
    :class:`~braintrace.Learner`, or a face learner
    (:class:`~braintrace.algorithms.face.FaceLearner`, whose ``core_of(model)`` gives
    the core learner of a model)."""
    learner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", None)
    if not isinstance(learner, (Learner, FaceLearner)) or name not in _METHODS:
        raise TypeError(
            f"braintrace.parallel.{where}: expected a learner's bound step, window or scan "
            f"(e.g. data_parallel(learner.scan, mesh)), got {method!r}. For an nn.RNN or "
            "nnx.RNN learner, pass learner.inner's method, with time-major data."
        )
    if not learner.batched:
        raise ValueError(
            f"braintrace.parallel.{where}: {learner!r} is not batched, so it has no batch "
            "to split over devices; compile it with batched=True."
        )
    return learner


def _face_data_parallel(learner, name: str, mesh: Mesh, axis: str) -> Callable:
    """``data_parallel`` for a face learner: its model is split into the core's params
    (replicated), the rest is closed over, and the gradients are mapped back."""

    def run(model, state: LearnerState, xs, targets, **kwargs):
        core, params, to_grads = learner.core_of(model)
        method = data_parallel(getattr(core, name), mesh, axis)
        result, grads, state = method(params, state, xs, targets, **kwargs)
        return result, to_grads(grads), state

    return run


def data_parallel(method: Callable, mesh: Mesh, axis: str = "batch") -> Callable:
    """Run ``learner.step``, ``.window`` or ``.scan`` with the batch split over ``axis``.

    Every device runs ``method`` on its slice of the batch (its samples' hidden state,
    traces, inputs and targets); the loss and the gradient, batch means, are then
    averaged over the devices, so the result is the one-device result. The new state
    and the outputs stay split by sample. Place the arguments once with
    :func:`replicate`, :func:`shard_state` and :func:`shard_batch` (else they are
    scattered on every call) and ``jax.jit`` the returned function.

    Parameters
    ----------
    method : callable
        A bound ``step``, ``window`` or ``scan`` of a learner compiled with
        ``batched=True``: a core learner's (``params`` first), or an Equinox or NNX
        face learner's (the model first, as in its methods; its trained arrays are
        replicated and its gradients come back model-shaped: wrap the result in
        ``eqx.filter_jit`` or ``nnx.jit``). A linen learner is a core learner.
    mesh : jax.sharding.Mesh
    axis : str
        The mesh axis the batch is split over (the loss and gradient are averaged
        over it; any other mesh axis holds replicas).

    Returns
    -------
    callable
        Same signature and results as ``method`` (``scan`` keeps its ``window=``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace as bt
    >>> from braintrace.testing import models
    >>> learner = bt.compile(models.rnn_step, models.mse, bt.D_RTRL(), batched=True)
    >>> mesh = batch_mesh()
    >>> params = replicate(models.rnn_params(0), mesh)
    >>> batch = 2 * mesh.size
    >>> x, y = shard_batch((jnp.ones((batch, models.N_IN)), jnp.zeros((batch, 2))), mesh)
    >>> state = shard_state(learner.init(params, jnp.zeros((batch, models.N)), x), mesh)
    >>> (loss, out), grads, state = jax.jit(data_parallel(learner.step, mesh))(
    ...     params, state, x, y)
    >>> loss.shape, out.shape == (batch, 2), grads["wh"].sharding.is_fully_replicated
    ((), True, True)
    """
    learner = _learner_of(method, "data_parallel")
    _check_axis(mesh, axis, "data_parallel")
    if isinstance(learner, FaceLearner):
        return _face_data_parallel(learner, method.__name__, mesh, axis)
    data = P(axis) if method.__name__ == "step" else P(None, axis)
    n = mesh.shape[axis]

    def run(params, state: LearnerState, xs, targets, **kwargs):
        # shard_map's own message for a ragged split names no array: say which one.
        _check_batch_splits(state, n, axis)

        def local(params, state, xs, targets):
            (loss, out), grads, state = method(params, state, xs, targets, **kwargs)
            return (lax.pmean(loss, axis), out), lax.pmean(grads, axis), state

        # check_vma=False: each device differentiates its own samples' loss and the
        # pmean above is the one cross-device sum. (With the check on, JAX would also
        # insert `pvary` casts into the traced step, which hide the ETP ops' paths
        # from the compiler.)
        mapped = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(axis), data, data),
            out_specs=((P(), data), P(), P(axis)),
            check_vma=False,
        )
        return mapped(params, state, xs, targets)

    return run


def _check_batch_splits(state, n: int, axis: str) -> None:
    if not isinstance(state, LearnerState) or np.ndim(state.count) == 0:
        raise ValueError(
            "braintrace.parallel.data_parallel: expected the batched LearnerState of this "
            "learner (from learner.init, placed with shard_state)."
        )
    size = np.shape(state.count)[0]
    if size % n:
        raise ValueError(
            f"braintrace.parallel.data_parallel: the batch of {size} samples does not split "
            f"evenly over the {n} devices of mesh axis {axis!r}; use a batch size that is "
            f"a multiple of {n}."
        )
