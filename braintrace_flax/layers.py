"""Linen layers backed by ETP ops: :class:`ETPDense`, :class:`ETPLoRA`, :class:`ETPElemwise`.

Each layer creates its parameters exactly as a stock linen layer would and hands the
*raw* parameter to the op (casts for ``dtype`` happen inside the op), so the
braintrace compiler sees which ``params`` leaf each op trains.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from flax.linen import module as flax_module

from braintrace import ops

from ._promote import single_dtype

__all__ = ["ETPDense", "ETPLoRA", "ETPElemwise", "FROZEN", "dense_forward"]

Array = jax.Array
Initializer = Callable[..., Array]

#: Collection holding non-trainable weights (a LoRA layer's frozen base kernel).
FROZEN = "frozen"

_DENSE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(nn.Dense)}


def where(module: nn.Module) -> str:
    """``"ClassName at 'a/b'"``: how errors name a layer."""
    try:
        path = "/".join(str(p) for p in module.path) or "<top level>"
    except Exception:  # noqa: BLE001 - an unbound module has no path
        path = module.name or "<unbound>"
    return f"{type(module).__name__} at {path!r}"


# -- dense ------------------------------------------------------------------------------


def _compute_dtype(module: nn.Module, inputs: Array, kernel: Array, bias: Array | None):
    """The dtype ``nn.Dense`` would compute in (via ``module.promote_dtype``)."""
    if module.promote_dtype is _DENSE_DEFAULTS["promote_dtype"]:
        return flax_dtypes.canonicalize_dtype(inputs, kernel, bias, dtype=module.dtype)
    # A custom promote_dtype: honour the dtypes it produces (the op casts inside).
    out = jax.eval_shape(
        lambda i, k, b: module.promote_dtype(i, k, b, dtype=module.dtype), inputs, kernel, bias
    )
    return single_dtype(where(module), out, (inputs, kernel, bias))


def _check_dot_general(module: nn.Module) -> None:
    for field in ("dot_general", "dot_general_cls"):
        if getattr(module, field, None) is not None:
            raise ValueError(
                f"{where(module)}: {field}={getattr(module, field)!r} cannot be honoured by the "
                "ETP dense op (it computes lax.dot_general itself, and its trace rules depend "
                f"on it). Leave {field}=None, or keep flax.linen.Dense for this layer (its "
                "kernel then gets a one-step gradient, not a trace)."
            )


def dense_forward(module: nn.Module, inputs: Array) -> Array:
    """``nn.Dense``'s computation through :func:`braintrace.ops.dense`.

    ``module`` is any module with ``nn.Dense``'s fields (an :class:`ETPDense`, or a
    stock ``nn.Dense`` being rerouted by :func:`braintrace_flax.etp_dense_calls`); it
    must be inside its compact ``__call__``. Parameters are created with the same
    names, shapes, initialisers and RNG order as ``nn.Dense``.

    Parameters
    ----------
    module : flax.linen.Module
        The layer (supplies ``features``, ``use_bias``, ``dtype``, ...).
    inputs : Array
        ``(..., in)``; any number of leading axes.

    Returns
    -------
    Array
        ``(..., features)``.
    """
    _check_dot_general(module)
    if jnp.ndim(inputs) == 0:
        raise ValueError(
            f"{where(module)}: inputs must have at least one axis (..., in), got a scalar."
        )
    kernel = module.param(
        "kernel", module.kernel_init, (jnp.shape(inputs)[-1], module.features), module.param_dtype
    )
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    dtype = _compute_dtype(module, inputs, kernel, bias)
    x = jnp.asarray(inputs, dtype)  # the input is not a parameter: cast it here
    lead = x.shape[:-1]
    if x.ndim > 2:  # the op takes (in,) or (batch, in): fold the leading axes
        x = x.reshape((math.prod(lead), x.shape[-1]))
    y = ops.dense(x, kernel, bias, dtype=dtype, precision=module.precision)
    return y.reshape(lead + (module.features,))


def _linen_internal(owner: Any, name: str, what: str) -> Any:
    """``owner.name`` from linen's private state, or an error saying Flax changed it."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise RuntimeError(
            f"braintrace_flax: this Flax version ({flax.__version__}) no longer has linen's "
            f"{what} ({name!r}), which the ETP layers read to take the stock layer's "
            "auto-name (Dense_0, GRUCell_0, ...) so checkpoints swap. Pass name=... to the "
            "layer explicitly, or use a Flax version braintrace_flax supports (0.12)."
        ) from None


def autoname_like(module: nn.Module, prefix: str) -> None:
    """Give an unnamed submodule a stock layer's auto-name (``Dense_0``, ``Dense_1``, ...).

    Swapping ``nn.Dense`` for :class:`ETPDense` in a ``@compact`` model then keeps every
    parameter path, so checkpoints load either way. Call it first in ``__post_init__``.
    This is the one place that reads linen's private naming state (the module stack,
    the parent's auto-name cursor); if a Flax release changes it, this raises a
    ``RuntimeError`` that says so instead of silently renaming parameters.
    """
    if module.name is not None:
        return
    parent = module.parent
    if parent is _linen_internal(flax_module, "_unspecified_parent", "parent sentinel"):
        context = _linen_internal(flax_module, "_context", "module context")
        stack = _linen_internal(context, "module_stack", "module stack")
        parent = stack[-1] if stack else None
    if not isinstance(parent, nn.Module):
        return  # a top-level module: linen gives it no name either
    state = _linen_internal(parent, "_state", "module state")
    cursor = _linen_internal(state, "autoname_cursor", "auto-name cursor")
    if _linen_internal(state, "in_setup", "setup flag"):
        return  # named by the attribute it is assigned to, as stock layers are
    if not _linen_internal(parent, "_initialization_allowed", "initialization flag"):
        return  # linen itself raises the error for this misuse
    count = cursor.get(prefix, 0)
    object.__setattr__(module, "name", f"{prefix}_{count}")
    cursor[prefix] = count + 1


class ETPDense(nn.Dense):
    """Drop-in for ``flax.linen.Dense`` whose kernel and bias train by eligibility traces.

    Same fields in the same order with the same defaults, the same parameters
    (``kernel (in, features)``, ``bias (features,)``), initialisers, RNG use and
    auto-name (``Dense_<n>`` inside a compact parent), so a checkpoint of either layer
    loads into the other. Inputs may have any number of leading axes.
    ``nn.with_partitioning`` boxes are kept.

    Attributes
    ----------
    features : int
        Number of output features.
    use_bias : bool
        Whether to add a bias (default ``True``).
    dtype : dtype, optional
        Computation dtype (default: promote inputs and params, as ``nn.Dense``). The
        cast happens inside the ETP op.
    param_dtype : dtype
        Parameter dtype (default ``float32``).
    precision : jax.lax.Precision, optional
        Passed to ``lax.dot_general``.
    kernel_init, bias_init : initializer
        As ``nn.Dense`` (``lecun_normal()`` and zeros).
    promote_dtype : callable
        Only its dtype effect is honoured (it must cast to one dtype).
    dot_general, dot_general_cls : None
        Must stay ``None``: the ETP op computes the product itself (an error says so).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import ETPDense
    >>> x = jnp.ones((2, 3))
    >>> v = ETPDense(4).init(jax.random.key(0), x)
    >>> v_ref = nn.Dense(4).init(jax.random.key(0), x)
    >>> bool((v['params']['kernel'] == v_ref['params']['kernel']).all())
    True
    >>> ETPDense(4).apply(v, jnp.ones((5, 2, 3))).shape
    (5, 2, 4)
    """

    def __post_init__(self) -> None:
        autoname_like(self, "Dense")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Apply ``y = inputs @ kernel (+ bias)`` over the last axis through the ETP op."""
        return dense_forward(self, inputs)


# -- LoRA -------------------------------------------------------------------------------


class ETPLoRA(nn.Module):
    """Low-rank adapter ``y = x @ W0 + scale * (x @ lora_a) @ lora_b (+ bias)`` as an ETP op.

    Trainable parameters (Flax NNX's names): ``lora_a (in, rank)``, ``lora_b (rank,
    features)`` and ``bias (features,)``. The frozen base kernel ``W0 (in, features)``
    never enters ``params``:

    - ``base_kernel=None``: no base (a pure low-rank layer);
    - ``base_kernel=<initializer>``: ``W0`` is created in the ``'frozen'`` collection
      (:data:`FROZEN`), so ``optax`` never sees it. Pass it to the learner with
      ``braintrace_flax.compile(..., constants=variables)`` and to ``apply`` with the
      rest of ``variables``;
    - ``base_kernel=<array>``: a fixed ``(in, features)`` array (e.g. a pretrained
      ``nn.Dense`` kernel), a constant of the module.

    Attributes
    ----------
    features : int
        Output features.
    rank : int
        Rank ``r`` of the update.
    scale : float
        Static scale of the low-rank update (default 1.0).
    use_bias : bool
        Whether to add a trainable bias (default ``True``).
    base_kernel : None, initializer or array
        The frozen base kernel (see above).
    a_init, b_init, bias_init : initializer
        Defaults as NNX's ``LoRA``: ``he_uniform()`` for ``lora_a``, zeros for
        ``lora_b`` (the update starts at zero) and for the bias.
    param_dtype : dtype
        Dtype of the parameters; the input is cast to it (``ops.lora`` computes in the
        parameters' dtype).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPLoRA
    >>> layer = ETPLoRA(4, rank=2, base_kernel=jax.nn.initializers.lecun_normal())
    >>> x = jnp.ones((2, 3), jnp.float32)
    >>> v = layer.init(jax.random.key(0), x)
    >>> sorted(v['params']), sorted(v['frozen'])
    (['bias', 'lora_a', 'lora_b'], ['base_kernel'])
    >>> layer.apply(v, x).shape
    (2, 4)
    """

    features: int
    rank: int
    scale: float = 1.0
    use_bias: bool = True
    base_kernel: Any = None
    a_init: Initializer = nn.initializers.he_uniform()
    b_init: Initializer = nn.initializers.zeros_init()
    bias_init: Initializer = nn.initializers.zeros_init()
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Apply the adapter over the last axis (any number of leading axes)."""
        if jnp.ndim(inputs) == 0:
            raise ValueError(f"{where(self)}: inputs must be (..., in), got a scalar.")
        if self.rank < 1:
            raise ValueError(f"{where(self)}: rank must be >= 1, got {self.rank}.")
        n_in = jnp.shape(inputs)[-1]
        lora_a = self.param("lora_a", self.a_init, (n_in, self.rank), self.param_dtype)
        lora_b = self.param("lora_b", self.b_init, (self.rank, self.features), self.param_dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        base = self._base(n_in)
        dtype = jnp.dtype(lora_a.dtype)
        promoted = flax_dtypes.canonicalize_dtype(inputs, lora_a)
        if promoted != dtype:
            raise TypeError(
                f"{where(self)}: the input ({jnp.result_type(inputs)}) would promote the "
                f"{dtype} parameters to {promoted}, and ops.lora computes in its parameters' "
                f"dtype. Set param_dtype={promoted.name} or cast the input to {dtype.name}."
            )
        x = jnp.asarray(inputs, dtype)
        lead = x.shape[:-1]
        if x.ndim > 2:
            x = x.reshape((math.prod(lead), n_in))
        y = ops.lora(x, lora_a, lora_b, bias, scale=self.scale, base_weight=base)
        return y.reshape(lead + (self.features,))

    def _base(self, n_in: int) -> Array | None:
        spec = self.base_kernel
        if spec is None:
            return None
        shape = (n_in, self.features)
        if callable(spec):
            if self.is_initializing() or self.has_variable(FROZEN, "base_kernel"):
                rng = self.make_rng("params") if self.is_initializing() else None
                var = self.variable(FROZEN, "base_kernel", spec, rng, shape, self.param_dtype)
                return jnp.asarray(nn.meta.unbox(var.value), self.param_dtype)
            raise ValueError(
                f"{where(self)}: the frozen base kernel is missing: apply with the whole "
                f"variables tree (it lives in the {FROZEN!r} collection), e.g. "
                "module.apply(variables, ...), or braintrace_flax.compile(..., "
                "constants=variables)."
            )
        base = jnp.asarray(spec)
        if base.shape != shape:
            raise ValueError(
                f"{where(self)}: base_kernel must have shape (in, features) = {shape}, got "
                f"{tuple(base.shape)}."
            )
        return base.astype(self.param_dtype)


# -- elementwise ------------------------------------------------------------------------


class ETPElemwise(nn.Module):
    """A trainable per-neuron parameter, returned through the elementwise ETP op.

    ``ETPElemwise(shape, weight_init, fn)()`` creates ``params['weight']`` of
    ``shape`` and returns ``fn(weight)`` (identity when ``fn`` is ``None``); use it for
    a membrane time constant, a decay, a threshold or a gate bias.

    Attributes
    ----------
    shape : int or tuple of int
        Shape of ``weight`` (usually ``(features,)``).
    weight_init : initializer
        ``weight_init(key, shape, param_dtype)``. (Named ``weight_init``, not ``init``,
        because ``init`` is ``Module.init``; pass it positionally.)
    fn : callable, optional
        Elementwise map applied to ``weight``. Use a function defined once, or a
        hashable callable such as :class:`braintrace_flax.ExpDecay`, so jit caches
        stay warm.
    param_dtype : dtype
        Dtype of ``weight`` (default ``float32``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPElemwise
    >>> tau = ETPElemwise((3,), jax.nn.initializers.zeros, jax.nn.sigmoid)
    >>> v = tau.init(jax.random.key(0))
    >>> tau.apply(v).tolist()
    [0.5, 0.5, 0.5]
    """

    shape: int | Sequence[int]
    weight_init: Initializer
    fn: Callable[[Array], Array] | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> Array:
        """Return ``fn(weight)`` through :func:`braintrace.ops.elemwise`."""
        shape = (self.shape,) if isinstance(self.shape, int) else tuple(self.shape)
        if not callable(self.weight_init):
            raise TypeError(
                f"{where(self)}: weight_init must be an initializer weight_init(key, shape, "
                f"dtype), got {type(self.weight_init).__name__}."
            )
        weight = self.param("weight", self.weight_init, shape, self.param_dtype)
        try:
            return ops.elemwise(weight, self.fn)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where(self)}: {err}") from err
