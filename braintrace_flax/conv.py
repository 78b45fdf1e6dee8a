"""Linen convolution backed by the ETP conv op: :class:`ETPConv`, a twin of ``nn.Conv``."""

from __future__ import annotations

import flax.linen as nn
import jax

from . import _conv
from .layers import _compute_dtype, autoname_like, where

__all__ = ["ETPConv", "conv_forward"]

Array = jax.Array


def conv_forward(module: nn.Module, inputs: Array) -> Array:
    """``nn.Conv``'s computation through :func:`braintrace.ops.conv`.

    ``module`` is an :class:`ETPConv` or a stock ``nn.Conv`` rerouted by
    :func:`braintrace_flax.etp_dense_calls`, inside its compact ``__call__``. The
    parameters (``kernel (*kernel_size, in // feature_group_count, features)``,
    ``bias (features,)``) are created with ``nn.Conv``'s names, shapes, initialisers
    and RNG order, and the output is ``nn.Conv``'s bit for bit.

    Parameters
    ----------
    module : flax.linen.Module
        The layer (supplies ``features``, ``kernel_size``, ``strides``, ``padding``, ...).
    inputs : Array
        ``(*batch, *spatial, in)``, channels last, any number of batch axes (none too).

    Returns
    -------
    Array
        ``(*batch, *out_spatial, features)``.
    """
    owner = where(module)
    size = module.kernel_size
    window = (size,) if isinstance(size, int) else tuple(size)
    n = len(window)
    _conv.check_options(
        owner,
        input_dilation=_conv.spatial(module.input_dilation, n),
        mask=module.mask,
        custom=_custom_conv(module),
    )
    x, batch_shape = _conv.fold_batch(owner, inputs, n)
    dilation = _conv.spatial(module.kernel_dilation, n)
    x, padding = _conv.pad_inputs(owner, x, module.padding, window, dilation)
    in_features, groups = x.shape[-1], module.feature_group_count
    if in_features % groups:
        raise ValueError(
            f"{owner}: the inputs' {in_features} features must be a multiple of "
            f"feature_group_count={groups}."
        )
    shape = window + (in_features // groups, module.features)
    kernel = module.param("kernel", module.kernel_init, shape, module.param_dtype)
    bias = None
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (module.features,), module.param_dtype)
    y = _conv.conv_call(
        owner,
        x,
        kernel,
        bias,
        _compute_dtype(module, x, kernel, bias),
        strides=_conv.spatial(module.strides, n),
        padding=padding,
        rhs_dilation=dilation,
        feature_group_count=groups,
        precision=module.precision,
    )
    return y if batch_shape is None else y.reshape(batch_shape + y.shape[1:])


def _custom_conv(module: nn.Module) -> str | None:
    for field in ("conv_general_dilated", "conv_general_dilated_cls"):
        if getattr(module, field, None) is not None:
            return f"{field}={getattr(module, field)!r}"
    return None


class ETPConv(nn.Conv):
    """Drop-in for ``flax.linen.Conv`` whose kernel and bias train by eligibility traces.

    Same fields, defaults, parameters (``kernel (*kernel_size, in // feature_group_count,
    features)``, ``bias (features,)``), initialisers, RNG use and auto-name
    (``Conv_<n>``), and the same output bit for bit; the convolution runs through
    :func:`braintrace.ops.conv`. Every padding ``nn.Conv`` takes works (``'CIRCULAR'``,
    ``'REFLECT'`` and ``'CAUSAL'`` pad the input first, as ``nn.Conv`` does).
    ``input_dilation`` must stay 1, ``mask`` and ``conv_general_dilated(_cls)``
    ``None`` (an error says so). Trace memory: see :func:`braintrace.ops.conv`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import ETPConv
    >>> x = jnp.ones((2, 8, 8, 2))
    >>> v = ETPConv(4, (3, 3), strides=2).init(jax.random.key(0), x)
    >>> v_ref = nn.Conv(4, (3, 3), strides=2).init(jax.random.key(0), x)
    >>> bool((v['params']['kernel'] == v_ref['params']['kernel']).all())
    True
    >>> ETPConv(4, (3, 3), strides=2).apply(v, x).shape
    (2, 4, 4, 4)
    """

    def __post_init__(self) -> None:
        autoname_like(self, "Conv")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Convolve ``inputs`` (channels last) through the ETP conv op."""
        return conv_forward(self, inputs)
