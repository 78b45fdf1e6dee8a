"""Ready NNX cells built from ETP layers: ``carry, y = cell(carry, x)``.

- :class:`ETPLIFCell`: the leaky integrate-and-fire neuron of every braintrace face
  (linen's :class:`braintrace_flax.ETPLIFCell`, Equinox's
  :class:`braintrace_eqx.ETPLIFCell`): same equations, carry ``(v, i)``, parameters
  ``linear`` and ``decay``.
- :class:`ETPGRUCell`, :class:`ETPLSTMCell`, :class:`ETPOptimizedLSTMCell`:
  ``nnx.GRUCell`` / ``nnx.LSTMCell`` / ``nnx.OptimizedLSTMCell`` with their
  ``nnx.Linear`` layers as :class:`ETPLinear` (the cell after
  :func:`braintrace_flax.nnx.convert`): same constructor, ``Param`` s, values and
  outputs. NNX's GRU and optimized LSTM fuse their gates into one kernel and slice
  its output; the compiler traces those kernels through the slice (index maps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from braintrace.surrogate import decay_logit, lif_step, spike

from .convert import convert
from .layers import ETPElemwise, ETPLinear

__all__ = ["ETPLIFCell", "ETPGRUCell", "ETPLSTMCell", "ETPOptimizedLSTMCell"]

Array = jax.Array
_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()  # nnx.Linear's defaults
_DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()


class ETPLIFCell(nnx.RNNCellBase):
    r"""Leaky integrate-and-fire neurons with a trainable membrane decay.

    The neuron of every braintrace face (linen's :class:`braintrace_flax.ETPLIFCell`
    and Equinox's :class:`braintrace_eqx.ETPLIFCell` compute the same equations with
    the same parameters). Two states per neuron, the membrane voltage ``v`` and the
    synaptic current ``i`` (carry ``(v, i)``); the output is the spike ``s_t``::

        i_t = syn_decay * i_{t-1} + x_t @ W + b                    (ETPLinear 'linear')
        a   = sigmoid(decay.weight)                                 (ETPElemwise 'decay')
        v_t = a * v_{t-1} * (1 - spike(v_{t-1} - threshold)) + (1 - a) * i_t
        s_t = spike(v_t - threshold)

    ``spike`` is :func:`braintrace.spike` (surrogate sharpness ``slope``). With no
    recurrent weights the cell is in braintrace's exact class: D-RTRL's gradient
    equals BPTT's. ``Param`` s: ``linear.kernel (in, hidden)``, ``linear.bias``,
    ``decay.weight (hidden,)`` (the logit of the membrane decay).

    Parameters
    ----------
    in_features, hidden_features : int
        Input size and number of neurons.
    mem_decay : float
        Initial membrane decay ``a`` in (0, 1), the same for every neuron.
    syn_decay : float
        Fixed synaptic decay.
    threshold, slope : float
        Firing threshold and surrogate slope.
    use_bias : bool
        Bias on the input current.
    kernel_init, bias_init : initializer
        For ``linear`` (``nnx.Linear``'s defaults).
    dtype, param_dtype : dtype
        As ``nnx.Linear``'s.
    rngs : nnx.Rngs
        Initialisation keys.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = btnnx.ETPLIFCell(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(x.shape)
    >>> (v, i), s = cell(carry, x)
    >>> s.shape, cell.decay.weight.shape
    ((2, 4), (4,))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        mem_decay: float = 0.9,
        syn_decay: float = 0.8,
        threshold: float = 1.0,
        slope: float = 4.0,
        use_bias: bool = True,
        kernel_init: Callable[..., Array] = _DEFAULT_KERNEL_INIT,
        bias_init: Callable[..., Array] = _DEFAULT_BIAS_INIT,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        logit = decay_logit(mem_decay, f"ETPLIFCell({in_features}, {hidden_features})")
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.syn_decay = float(syn_decay)
        self.threshold = float(threshold)
        self.slope = float(slope)
        self.param_dtype = param_dtype
        self.linear = ETPLinear(
            in_features,
            hidden_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self.decay = ETPElemwise(
            (hidden_features,),
            nnx.initializers.constant(logit),
            jax.nn.sigmoid,
            rngs=rngs,
            param_dtype=param_dtype,
        )

    def __call__(self, carry: tuple[Array, Array], inputs: Array):
        """One step: ``((v_t, i_t), s_t)``."""
        v, i = lif_step(
            *carry,
            self.linear(inputs),
            self.decay(),
            syn_decay=self.syn_decay,
            threshold=self.threshold,
            slope=self.slope,
        )
        return (v, i), spike(v - self.threshold, self.slope)

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: Any = None,
        carry_init: Callable[..., Array] | None = None,
    ):
        """``(v, i)``, each ``input_shape[:-1] + (hidden_features,)`` (zeros by default)."""
        shape = tuple(input_shape[:-1]) + (self.hidden_features,)
        if carry_init is None:
            return jnp.zeros(shape, self.param_dtype), jnp.zeros(shape, self.param_dtype)
        if rngs is None:
            raise ValueError("ETPLIFCell.initialize_carry: pass rngs to use carry_init.")
        stream = rngs.carry if isinstance(rngs, nnx.Rngs) else rngs
        return carry_init(stream(), shape, self.param_dtype), carry_init(
            stream(), shape, self.param_dtype
        )

    @property
    def num_feature_axes(self) -> int:
        return 1


class ETPGRUCell(nnx.GRUCell):
    """``nnx.GRUCell`` with its fused ``dense_i`` / ``dense_h`` kernels behind ETP dense ops.

    Same constructor, ``Param`` s (``dense_i.kernel (in, 3H)``, ``dense_i.bias``,
    ``dense_h.kernel (H, 3H)``), values for the same ``rngs``, and outputs.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = btnnx.ETPGRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> stock = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> h, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
    >>> bool(jnp.allclose(cell(h, x)[0], stock(h, x)[0])), type(cell.dense_h).__name__
    (True, 'ETPLinear')
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        convert(self)


class ETPLSTMCell(nnx.LSTMCell):
    """``nnx.LSTMCell`` with its eight gate layers as :class:`ETPLinear` (one per gate).

    Same constructor, ``Param`` s (``ii, if_, ig, io`` without bias, ``hi, hf, hg,
    ho`` with), values and outputs; carry ``(c, h)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = btnnx.ETPLSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> carry = cell.initialize_carry((2, 3), nnx.Rngs(1))
    >>> (c, h), y = cell(carry, jnp.ones((2, 3)))
    >>> y.shape
    (2, 4)
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        convert(self)


class ETPOptimizedLSTMCell(nnx.OptimizedLSTMCell):
    """``nnx.OptimizedLSTMCell`` (gates fused in ``dense_i`` / ``dense_h``, ``4H`` outputs)
    with both layers as :class:`ETPLinear`; same constructor, ``Param`` s and outputs.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = btnnx.ETPOptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> cell.dense_h.kernel.shape
    (4, 16)
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        convert(self)
