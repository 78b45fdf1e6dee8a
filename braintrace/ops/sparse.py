"""Sparse dense ETP op: a fixed connectivity pattern with trainable values.

``y[k] = sum_{n : cols[n] = k} x[rows[n]] * values[n] (+ b[k])``: the ``(in, out)`` weight
is zero except at the ``nnz`` COO positions ``indices[n] = (rows[n], cols[n])``, which are
static (part of the equation, like a layer's shape); only ``values (nnz,)`` and the bias
train. Unbatched (``etp_sparse_mv``) and batched (``etp_sparse_mm``) primitives.

Every value feeds one output, ``y[cols[n]]``, so the D-RTRL trace lives on the non-zeros
only and is exact there: ``nnz * S`` numbers per sample (plus ``out * S`` for the bias),
never ``in * out * S``. pp_prop keeps ``epsx`` (``in``) and ``epsf`` (``out x S``) and
credits ``values[n]`` with ``epsx[rows[n]] * ghat[cols[n]]``. See ``docs/algorithms.md``,
"Grouped and sparse dense".
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks
from ._pair import register_pair, weight_and_bias
from .dense import _init_drtrl, _sum_lead, entries_at, init_output_trace

__all__ = ["sparse_dense", "SparsePattern", "etp_sparse_mv", "etp_sparse_mm"]

_OP = "braintrace.ops.sparse_dense"


class SparsePattern:
    """A static COO pattern: ``rows``, ``cols`` (``nnz`` ints each) and the dense ``shape``.

    Hashable and compared by value, so it can be a primitive parameter (equal patterns
    share compiled code). Build it with :meth:`from_indices`, which checks the indices.

    Examples
    --------
    >>> from braintrace.ops.sparse import SparsePattern
    >>> p = SparsePattern.from_indices([[0, 1], [2, 0]], (3, 2))
    >>> p, p.rows.tolist(), p.cols.tolist()
    (SparsePattern(nnz=2, shape=(3, 2)), [0, 2], [1, 0])
    """

    __slots__ = ("rows", "cols", "shape", "_key")

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
        self.rows = np.array(rows, np.int32)  # own copies, frozen: the pattern is static
        self.cols = np.array(cols, np.int32)
        self.rows.flags.writeable = False
        self.cols.flags.writeable = False
        self.shape = (int(shape[0]), int(shape[1]))
        self._key = (self.shape, self.rows.tobytes(), self.cols.tobytes())

    @property
    def nnz(self) -> int:
        """Number of stored connections."""
        return int(self.rows.size)

    @property
    def mean_fan_in(self) -> float:
        """Connections per output on average, ``nnz / out`` (for a LeCun-style init scale)."""
        return self.nnz / self.shape[1]

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SparsePattern) and self._key == other._key

    def __repr__(self) -> str:
        return f"SparsePattern(nnz={self.nnz}, shape={self.shape})"

    def to_dense(self, values: jax.Array) -> jax.Array:
        """The ``(in, out)`` weight with ``values`` scattered (duplicates add up)."""
        full = jnp.zeros(self.shape, values.dtype)
        return full.at[self.rows, self.cols].add(values)

    @classmethod
    def from_indices(cls, indices: Any, shape: Any, op: str = _OP) -> SparsePattern:
        """Check ``indices`` (``(nnz, 2)`` static ints inside ``shape``) and build the pattern.

        Errors start with ``op`` and name the first bad index.
        """
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError as err:
            raise TypeError(
                f"{op}: shape must be a pair of ints (in, out), got {shape!r}."
            ) from err
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{op}: shape must be a pair of positive ints (in, out), got {shape}.")
        idx = _static_indices(indices, op)
        bad = np.flatnonzero((idx < 0).any(1) | (idx[:, 0] >= shape[0]) | (idx[:, 1] >= shape[1]))
        if bad.size:
            n = int(bad[0])
            raise ValueError(
                f"{op}: indices[{n}] = ({idx[n, 0]}, {idx[n, 1]}) is out of range for shape "
                f"{shape} (rows in [0, {shape[0]}), cols in [0, {shape[1]})); {bad.size} "
                "index pair(s) are out of range. Fix the connectivity pattern or the shape."
            )
        return cls(idx[:, 0], idx[:, 1], shape)


def _static_indices(indices: Any, op: str) -> np.ndarray:
    if isinstance(indices, jax.core.Tracer):
        raise TypeError(
            f"{op}: indices must be static (a numpy array or a list of (row, col) pairs), "
            "got a traced array; the pattern is part of the op, not an input. Close over a "
            "numpy array instead of passing it through jit or the params tree."
        )
    idx = np.asarray(indices)
    if idx.size == 0:
        raise ValueError(f"{op}: indices is empty; give at least one (row, col) pair.")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{op}: indices must be integers, got dtype {idx.dtype}.")
    if idx.ndim != 2 or idx.shape[1] != 2:
        raise ValueError(f"{op}: indices must have shape (nnz, 2), got {idx.shape}.")
    return idx.astype(np.int64)


#: When the dense ``(in, out)`` weight has at most this many entries per connection
#: (density >= 1/32), the forward pass multiplies by the scattered weight and the VJP
#: rule ``xy_to_dw`` picks the non-zeros out of the dense outer product: a matmul is then
#: faster on CPU than gathers and a scatter-add (3x at 64 x 128, 10% dense). Sparser
#: patterns take the gather / scatter-add path, whose cost and memory grow with ``nnz``
#: only. The traces are the same either way (``nnz x S`` per sample).
DENSE_RATIO = 32


def _dense_path(pattern) -> bool:
    return pattern.shape[0] * pattern.shape[1] <= DENSE_RATIO * pattern.nnz


def _sparse_impl(x, values, *bias, pattern, has_bias, dtype):
    del has_bias
    x, values, *bias = _checks.cast(dtype, x, values, *bias)
    if _dense_path(pattern):
        y = x @ pattern.to_dense(values)
    else:
        contrib = x[..., pattern.rows] * values
        y = jnp.zeros(x.shape[:-1] + (pattern.shape[1],), contrib.dtype)
        y = y.at[..., pattern.cols].add(contrib)
    if bias:
        y = y + bias[0]
    return y


_trainables = weight_and_bias("values")


# -- rules (shared by both primitives; ``...`` is the batch axis of etp_sparse_mm) -----------


def sparse_yw_to_w(output_vector, trace, *, pattern, has_bias, **_):
    """Scale a ``(..., nnz)`` trace by the output entry each value feeds."""
    scaled = {"values": trace["values"] * output_vector[..., pattern.cols]}
    if has_bias:
        scaled["bias"] = trace["bias"] * output_vector
    return scaled


def sparse_xy_to_dw(x, y_cotangent, w, *, pattern, has_bias, **_):
    """VJP w.r.t. ``{'values', 'bias'}``: ``x[rows[n]] * y_cotangent[cols[n]]`` per value."""
    if _dense_path(pattern):
        values = jnp.einsum("...i,...k->ik", x, y_cotangent)[pattern.rows, pattern.cols]
    else:
        prod = x[..., pattern.rows] * y_cotangent[..., pattern.cols]
        values = prod.reshape((-1, pattern.nnz)).sum(0)
    dw = {"values": values}
    if has_bias:
        dw["bias"] = _sum_lead(y_cotangent)
    return {k: v.astype(w[k].dtype) for k, v in dw.items()}


def sparse_input_entries(x, values, *bias, input_index, pattern, dtype, **_):
    """``dy[j] / dx[input_index[j]]``: the scattered weight's entry (0 off the pattern)."""
    if dtype is not None:
        values = values.astype(dtype)
    return entries_at(pattern.to_dense(values), input_index)


def _rules(batched: bool) -> dict:
    return dict(
        yw_to_w=sparse_yw_to_w,
        xy_to_dw=sparse_xy_to_dw,
        init_drtrl=functools.partial(_init_drtrl, batched),
        init_pp=init_output_trace,
        input_entries=sparse_input_entries,
    )


etp_sparse_mv, etp_sparse_mm = register_pair(
    "etp_sparse_mv", "etp_sparse_mm", _sparse_impl, _rules, trainable_invars_fn=_trainables
)


def _check_operands(x, values, bias, pattern) -> None:
    n_in, n_out = pattern.shape
    _checks.check_ndim(_OP, "x", x, (1, 2), f"({n_in},) or (batch, {n_in})")
    _checks.check_dim(_OP, "x's last axis must match shape[0] (in)", x.shape[-1], n_in)
    if values.shape != (pattern.nnz,):
        raise ValueError(
            f"{_OP}: values must have shape ({pattern.nnz},), one per index pair, got "
            f"{tuple(values.shape)}."
        )
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(
            f"{_OP}: bias must have shape ({n_out},) (shape[1] = out), got {tuple(bias.shape)}."
        )


@_checks.checked_signature(_OP)
def sparse_dense(
    x: jax.Array,
    values: jax.Array,
    indices: Any,
    shape: tuple[int, int],
    bias: jax.Array | None = None,
    *,
    dtype: Any = None,
) -> jax.Array:
    """Dense layer with a fixed sparse ``(in, out)`` weight, as an ETP op.

    ``y = x @ W (+ b)`` with ``W[indices[n, 0], indices[n, 1]] = values[n]`` and zero
    elsewhere (duplicate pairs add up). The pattern is static; ``values`` and ``bias``
    train. Memory of the traces per sample (``S`` states per output): D-RTRL
    ``(nnz + out) * S`` (bias included; on the non-zeros only, exact), pp_prop
    ``in + out * S``.

    Parameters
    ----------
    x : Array
        ``(in,)`` (binds ``etp_sparse_mv``) or ``(batch, in)`` (binds ``etp_sparse_mm``).
    values : Array
        ``(nnz,)``, the trainable non-zeros.
    indices : array_like of int
        ``(nnz, 2)`` static ``(row, col)`` = ``(input, output)`` positions (numpy, a list,
        or a :class:`SparsePattern`, whose ``shape`` must then equal ``shape``).
    shape : tuple of int
        ``(in, out)`` of the dense weight.
    bias : Array, optional
        ``(out,)``.
    dtype : dtype, optional
        Compute dtype; operands are cast inside the op. ``None`` requires matching dtypes.

    Returns
    -------
    Array
        ``(out,)`` or ``(batch, out)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace import ops
    >>> ops.sparse_dense(jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]),
    ...                  [[0, 2], [1, 0]], (2, 3)).tolist()
    [8.0, 0.0, 3.0]
    """
    if isinstance(indices, SparsePattern):
        pattern = indices
        if pattern.shape != tuple(int(s) for s in shape):
            raise ValueError(f"{_OP}: the pattern's shape {pattern.shape} differs from {shape}.")
    else:
        pattern = SparsePattern.from_indices(indices, shape)
    x = _checks.as_array(_OP, "x", x)
    values = _checks.as_array(_OP, "values", values)
    if bias is not None:
        bias = _checks.as_array(_OP, "bias", bias)
    _check_operands(x, values, bias, pattern)
    dtype = _checks.common_dtype(_OP, dtype, x=x, values=values, bias=bias)
    if all(a is None or a.dtype == dtype for a in (x, values, bias)):
        dtype = None  # nothing to cast: keep the equation free of no-op params
    prim = etp_sparse_mv if x.ndim == 1 else etp_sparse_mm
    operands = (x, values) if bias is None else (x, values, bias)
    return prim.bind(*operands, pattern=pattern, has_bias=bias is not None, dtype=dtype)
