"""NNX layers backed by ETP ops: :class:`ETPLinear`, :class:`ETPLoRA`, :class:`ETPElemwise`.

``ETPLinear`` and ``ETPLoRA`` subclass ``nnx.Linear`` and ``nnx.LoRA``: the constructor,
the ``Param`` s (names, shapes, initial values for the same ``rngs``) and the outputs
are the stock layers'; only ``__call__`` changes, handing the *raw* parameter values
to :func:`braintrace.ops.dense` / :func:`braintrace.ops.lora` (dtype casts happen
inside the op), so the braintrace compiler sees which ``Param`` each op trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from braintrace import ops

from .._promote import single_dtype

__all__ = ["ETPLinear", "ETPLoRA", "ETPElemwise"]

Array = jax.Array


def _compute_dtype(layer: nnx.Module, *arrays: Array | None) -> Any:
    """The one dtype ``layer.promote_dtype`` casts ``arrays`` to (the op casts inside)."""
    name = type(layer).__name__
    if layer.promote_dtype is nnx_dtypes.promote_dtype:
        return nnx_dtypes.canonicalize_dtype(*arrays, dtype=layer.dtype)
    out = jax.eval_shape(lambda *a: layer.promote_dtype(a, dtype=layer.dtype), *arrays)
    return single_dtype(name, out, arrays)


def _fold(inputs: Array, name: str) -> tuple[Array, tuple[int, ...]]:
    """``(..., in)`` to the op's ``(in,)`` or ``(batch, in)``, and the leading shape."""
    x = jnp.asarray(inputs)
    if x.ndim == 0:
        raise ValueError(f"{name}: inputs must have at least one axis (..., in), got a scalar.")
    lead = x.shape[:-1]
    if x.ndim > 2:
        x = x.reshape((-1, x.shape[-1]))
    return x, lead


def _check_dense_options(layer: nnx.Linear, out_sharding: Any) -> None:
    """The ``nnx.Linear`` options the ETP dense op cannot honour, each with the fix."""
    options = {
        "dot_general": (layer.dot_general is not jax.lax.dot_general, "leave it at the default"),
        "preferred_element_type": (layer.preferred_element_type is not None, "leave it None"),
        "out_sharding": (out_sharding is not None, "shard the output after the layer"),
    }
    for option, (bad, fix) in options.items():
        if bad:
            raise ValueError(
                f"ETPLinear({layer.in_features}, {layer.out_features}): {option} cannot be "
                f"honoured by the ETP dense op (it computes lax.dot_general itself and its trace "
                f"rules depend on it); {fix}, or keep nnx.Linear for this layer (its kernel then "
                "gets a one-step gradient, not a trace)."
            )


class ETPLinear(nnx.Linear):
    """Twin of ``flax.nnx.Linear`` whose kernel and bias train by eligibility traces.

    Same constructor (``in_features, out_features, *, use_bias, dtype, param_dtype,
    precision, kernel_init, bias_init, ..., rngs``), the same ``Param`` s
    (``kernel (in, out)``, ``bias (out,)``) with the same values for the same
    ``rngs``, and the same outputs and dtypes: a checkpoint of either loads into the
    other, and :func:`braintrace_flax.nnx.convert` turns an ``nnx.Linear`` into this
    class in place. Inputs may have any number of leading axes. ``dot_general``,
    ``preferred_element_type`` and ``out_sharding`` must stay at their defaults
    (an error says so).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> layer = btnnx.ETPLinear(3, 4, rngs=nnx.Rngs(0))
    >>> stock = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 3))
    >>> bool(jnp.allclose(layer(x), stock(x))), layer.kernel.shape
    (True, (3, 4))
    """

    def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
        """``inputs @ kernel (+ bias)`` over the last axis, through the ETP dense op."""
        _check_dense_options(self, out_sharding)
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        x, lead = _fold(inputs, f"ETPLinear({self.in_features}, {self.out_features})")
        dtype = _compute_dtype(self, x, kernel, bias)
        x = x.astype(dtype)  # the input is not a parameter: cast it here
        y = ops.dense(x, kernel, bias, dtype=dtype, precision=self.precision)
        return y.reshape(lead + (self.out_features,))


class ETPLoRA(nnx.LoRA):
    """Twin of ``flax.nnx.LoRA``: ``y = x @ lora_a @ lora_b (+ base_module(x))`` as an ETP op.

    Same constructor (``in_features, lora_rank, out_features, *, base_module, dtype,
    param_dtype, a_initializer, b_initializer, lora_param_type, promote_dtype, rngs``),
    the same ``lora_a (in, r)`` / ``lora_b (r, out)`` variables (``nnx.LoRAParam`` by
    default) with the same values, and the same outputs.

    The frozen base, NNX's way: ``base_module`` (e.g. a pretrained ``nnx.Linear``) is
    called as is and its output added; its ``Param`` s are frozen by training only
    the adapter, ``wrt=nnx.LoRAParam``, in both
    ``braintrace_flax.nnx.compile(..., wrt=nnx.LoRAParam)`` and
    ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``. Keep a frozen base a stock layer:
    the compiler refuses an ETP op whose weight is a constant of the step, so do not
    :func:`~braintrace_flax.nnx.convert` a base you freeze.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> base = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    >>> lora = btnnx.ETPLoRA(3, 2, 4, base_module=base, rngs=nnx.Rngs(1))
    >>> x = jnp.ones((5, 3))
    >>> bool(jnp.allclose(lora(x), base(x)))  # lora_b starts at zero
    True
    """

    def __call__(self, x: Array, **kwargs: Any) -> Array:
        """The adapter over the last axis (any number of leading axes)."""
        lora_a, lora_b = self.lora_a.get_value(), self.lora_b.get_value()
        name = f"ETPLoRA({self.in_features}, {lora_a.shape[1]}, {self.out_features})"
        inputs, lead = _fold(x, name)
        dtype = _compute_dtype(self, inputs, lora_a, lora_b)
        inputs = inputs.astype(dtype)
        out = ops.lora(inputs, lora_a, lora_b, dtype=dtype).reshape(lead + (self.out_features,))
        if self.base_module is not None:
            if not callable(self.base_module):
                raise ValueError(f"{name}: base_module must be callable.")
            out = out + self.base_module(inputs.reshape(lead + (self.in_features,)), **kwargs)
        return out


def _check_elementwise(fn: Callable, shape: tuple[int, ...], dtype: Any) -> None:
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))
    if getattr(out, "shape", None) != shape:
        raise ValueError(
            f"ETPElemwise{shape}: fn must be elementwise (output shape {shape} like weight), "
            f"got {getattr(out, 'shape', out)}."
        )


class ETPElemwise(nnx.Module):
    """A trainable per-neuron parameter, returned through the elementwise ETP op.

    ``ETPElemwise(shape, weight_init, fn, rngs=...)`` holds one ``nnx.Param`` named
    ``weight``; calling it with no arguments returns ``fn(weight)`` (identity when
    ``fn`` is ``None``). Use it for a membrane time constant, a decay, a threshold or
    a gate bias.

    Parameters
    ----------
    shape : int or tuple of int
        Shape of ``weight`` (usually ``(features,)``).
    weight_init : initializer
        ``weight_init(key, shape, param_dtype)``.
    fn : callable, optional
        Elementwise map applied to ``weight``. Use a function defined once, or a
        hashable callable such as :class:`braintrace_flax.ExpDecay`, so jit caches stay warm.
    rngs : nnx.Rngs
        Supplies the ``params`` key for ``weight_init``.
    param_dtype : dtype
        Dtype of ``weight`` (default ``float32``).

    Examples
    --------
    >>> import jax
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> gate = btnnx.ETPElemwise(3, jax.nn.initializers.zeros, jax.nn.sigmoid, rngs=nnx.Rngs(0))
    >>> gate().tolist()
    [0.5, 0.5, 0.5]
    """

    def __init__(
        self,
        shape: int | Sequence[int],
        weight_init: Callable[..., Array],
        fn: Callable[[Array], Array] | None = None,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
    ):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not callable(weight_init):
            raise TypeError(
                f"ETPElemwise{shape}: weight_init must be an initializer weight_init(key, "
                f"shape, dtype), got {type(weight_init).__name__}."
            )
        if fn is not None:
            if not callable(fn):
                raise TypeError(f"ETPElemwise{shape}: fn must be callable or None.")
            _check_elementwise(fn, shape, param_dtype)
        self.weight = nnx.Param(weight_init(rngs.params(), shape, param_dtype))
        self.fn = fn

    def __call__(self) -> Array:
        """``fn(weight)`` through :func:`braintrace.ops.elemwise`."""
        return ops.elemwise(self.weight.get_value(), self.fn)
