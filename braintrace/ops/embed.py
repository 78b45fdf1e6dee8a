"""Embedding ETP op: ``y = table[ids]``; ``etp_embed`` (one sample), ``etp_embed_batched``.

Trainable ``{'weight'}`` (the ``(V, F)`` table); the integer ``ids`` are the op's input
``x`` and get no gradient. Rules and memory are in ``docs/algorithms.md`` ("Embedding"):

- D-RTRL keeps, per sample and state, a trace of shape ``(*positions, V, F)``
  (``positions`` = the shape of one sample's ``ids``; a scalar id per sample gives a
  table-sized ``(V, F)``). It is exact: the table is shared across positions while
  ``D`` acts per output element, so the positions are kept, as for a convolution.
  Only the rows a sample has seen are non-zero, but which rows those are depends on
  the trace's history, and the additive update ``yw_to_w(D, eps) + xy_to_trace(x,
  D_f)`` cannot place a new row into a compact store (the second term does not see
  the first); a compact store would need a rule that reads the old trace.
- pp_prop's input-side trace is the one-hot encoding of the ids, ``(*positions, V)``
  (rule ``x_to_input_trace``), decayed like any input; its output side is ``y``-sized.
"""

from __future__ import annotations

import functools
import string
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._pair import register_pair
from .dense import init_output_trace

__all__ = ["embed", "etp_embed", "etp_embed_batched"]

_OP = "braintrace.ops.embed"


def _embed_impl(ids, table, *, dtype=None):
    if dtype is not None:
        table = table.astype(dtype)
    return jnp.take(table, ids, axis=0)


def _rows_of(ids, rows):
    """The table row each id reads: negative ids count from the end (``jnp.take``)."""
    return jnp.where(ids < 0, ids + rows, ids)


def _one_hot(ids, rows, dtype):
    """``(*ids.shape, rows)`` one-hot rows; an id outside ``[-rows, rows)`` gets none."""
    return (_rows_of(ids, rows)[..., None] == jnp.arange(rows)).astype(dtype)


def _letters(n):
    return string.ascii_lowercase[:n]


# -- rules (shared by the batched and unbatched primitives) --------------------
# A trace is ``(*lead, *positions, V, F)``; ``lead`` is the batch axis of the batched
# primitive. Gradient rules sum over everything but the table's axes.


def embed_yw_to_w(output_vector, trace, **_):
    """Scale a ``(..., V, F)`` trace by the output-shaped ``(..., F)`` vector."""
    return {"weight": trace["weight"] * output_vector[..., None, :]}


def embed_xy_to_trace(batched, x, y_cotangent, w, **_):
    """Instantaneous D-RTRL term ``onehot(ids)[..., v] * D_f[..., f]`` (positions kept).

    The batched primitive's rule sums over its leading batch axis.
    """
    table = w["weight"]
    term = _one_hot(x, table.shape[0], y_cotangent.dtype)[..., :, None]
    term = term * y_cotangent[..., None, :]
    return {"weight": term.sum(0) if batched else term}


def embed_trace_to_dw(dtrace, w, **_):
    """Sum a contracted ``(*positions, V, F)`` trace over the positions."""
    t = dtrace["weight"]
    return {"weight": t.sum(tuple(range(t.ndim - 2))).astype(w["weight"].dtype)}


def embed_xy_to_dw(x, y_cotangent, w, **_):
    """VJP w.r.t. the table at integer ``ids`` (a scatter-add of the cotangent rows).

    ``x`` may also be pp_prop's input trace, a float ``(..., V)`` encoding of the ids
    (``x_to_input_trace``): the gradient is then ``sum x[..., v] * y_cotangent[..., f]``.
    """
    table = w["weight"]
    if jnp.issubdtype(x.dtype, jnp.integer):
        flat = y_cotangent.reshape((-1, table.shape[1]))
        dw = jnp.zeros(table.shape, flat.dtype).at[_rows_of(x, table.shape[0]).reshape(-1)]
        dw = dw.add(flat, mode="drop")
    else:
        n = x.ndim - 1
        lead = _letters(n)
        dw = jnp.einsum(f"{lead}v,{lead}f->vf", x, y_cotangent)
    return {"weight": dw.astype(table.dtype)}


def embed_x_to_input_trace(x, w, **_):
    """pp_prop's view of the input: the one-hot rows of the ids, ``(*ids.shape, V)``."""
    table = w["weight"]
    return _one_hot(x, table.shape[0], table.dtype)


def embed_init_drtrl(x_var, y_var, weight_var, num_states):
    """Zeros ``(*ids.shape, V, F, S)``: a batched op's batch axis is ``ids``' first."""
    table = weight_var["weight"]
    shape = tuple(x_var.shape) + tuple(table.shape) + (num_states,)
    return {"weight": jnp.zeros(shape, table.dtype)}


def _rules(batched: bool) -> dict:
    return dict(
        yw_to_w=embed_yw_to_w,
        xy_to_dw=embed_xy_to_dw,
        init_drtrl=embed_init_drtrl,
        init_pp=init_output_trace,
        xy_to_trace=functools.partial(embed_xy_to_trace, batched),
        trace_to_dw=embed_trace_to_dw,
        x_to_input_trace=embed_x_to_input_trace,
    )


etp_embed, etp_embed_batched = register_pair("etp_embed", "etp_embed_batched", _embed_impl, _rules)


def _check_ids(ids) -> jax.Array:
    if ids is None:
        raise TypeError(f"{_OP}: ids is required, got None.")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{_OP}: ids must be integers (row indices into the table), got dtype "
            f"{ids.dtype}; cast them with ids.astype(jnp.int32). Ids are not trainable."
        )
    return ids


def _check_range(ids: jax.Array, rows: int) -> None:
    """Refuse out-of-range ids when they are concrete (eager calls)."""
    if isinstance(ids, jax.core.Tracer) or not ids.size:
        return  # traced: see ``embed``'s docstring for what JAX does then
    values = np.asarray(ids)
    low, high = int(values.min()), int(values.max())
    if low < -rows or high >= rows:
        raise IndexError(
            f"{_OP}: ids must lie in [{-rows}, {rows}) (the table has {rows} rows; negative "
            f"ids count from the end), got values in [{low}, {high}]."
        )


@_checks.checked_signature(_OP)
def embed(
    ids: jax.Array, table: jax.Array, *, batched: bool | None = None, dtype: Any = None
) -> jax.Array:
    """Embedding lookup as an ETP op: ``y = table[ids]``.

    The table trains by eligibility traces; the ids are the op's (integer,
    non-differentiable) input. Memory of the traces per sample: D-RTRL
    ``|ids| * V * F * S``, pp_prop ``|ids| * (V + F * S)`` (``|ids|`` = one sample's
    number of ids, ``S`` = the states driven); ``docs/algorithms.md``, "Embedding".

    Parameters
    ----------
    ids : Array
        Integer ids of any shape. With ``batched`` the first axis is the batch axis.
    table : Array
        ``(V, F)``: ``V`` rows (``num_embeddings``) of ``F`` features.
    batched : bool, optional
        Whether ``ids`` has a leading batch axis (binds ``etp_embed_batched``).
        Default: batched when ``ids`` has at least one axis, so a scalar id is one
        sample; pass ``batched=False`` for one sample's sequence of ids.
    dtype : dtype, optional
        Output dtype; the table is cast inside the op (so it still reaches the op as
        the raw parameter).

    Returns
    -------
    Array
        ``ids.shape + (F,)``.

    Notes
    -----
    Out-of-range ids: an eager call with concrete ids raises ``IndexError``. Under
    ``jit`` the op behaves as ``jnp.take(table, ids, axis=0)``, whose default mode
    ``"fill"`` returns NaN rows for ids outside ``[-V, V)`` (ids in ``[-V, 0)`` count
    from the end), and the trace rules drop those ids: no gradient reaches the table
    from them.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> table = jnp.arange(6.0).reshape(3, 2)
    >>> ops.embed(jnp.array([2, 0]), table).tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """
    ids = _check_ids(ids)
    table = _checks.as_array(_OP, "table", table)
    _checks.check_ndim(_OP, "table", table, (2,), "2-D (num_embeddings, features)")
    _check_range(ids, table.shape[0])
    if batched is None:
        batched = ids.ndim >= 1
    if batched and ids.ndim == 0:
        raise ValueError(f"{_OP}: batched=True needs ids with a leading batch axis, got a scalar.")
    if dtype is not None and np.dtype(dtype) == table.dtype:
        dtype = None  # nothing to cast: keep the equation free of no-op params
    prim = etp_embed_batched if batched else etp_embed
    return prim.bind(ids, table, dtype=None if dtype is None else np.dtype(dtype))
