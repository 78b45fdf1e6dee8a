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
- :class:`ETPLRUCell`: the linear recurrent unit of every braintrace face (complex
  diagonal recurrence, carry ``(re, im)``), in which D-RTRL is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from braintrace import lru
from braintrace.surrogate import decay_logit, lif_step, spike

from .convert import convert
from .layers import ETPElemwise, ETPLinear

__all__ = ["ETPLIFCell", "ETPGRUCell", "ETPLSTMCell", "ETPOptimizedLSTMCell", "ETPLRUCell"]

Array = jax.Array
_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()  # nnx.Linear's defaults
_DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()
_LRU_KERNEL_INIT = nnx.initializers.variance_scaling(0.5, "fan_in", "normal")  # the LRU paper's


def _pair_carry(cell, who: str, input_shape, rngs, carry_init) -> tuple[Array, Array]:
    """A carry of two ``input_shape[:-1] + (hidden_features,)`` leaves (zeros by default)."""
    shape = tuple(input_shape[:-1]) + (cell.hidden_features,)
    if carry_init is None:
        return jnp.zeros(shape, cell.param_dtype), jnp.zeros(shape, cell.param_dtype)
    if rngs is None:
        raise ValueError(f"{who}.initialize_carry: pass rngs to use carry_init.")
    stream = rngs.carry if isinstance(rngs, nnx.Rngs) else rngs
    return tuple(carry_init(stream(), shape, cell.param_dtype) for _ in range(2))


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
        return _pair_carry(self, "ETPLIFCell", input_shape, rngs, carry_init)

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


class ETPLRUCell(nnx.RNNCellBase):
    r"""A linear recurrent unit (LRU) layer: complex diagonal recurrence, exact for D-RTRL.

    The layer of every braintrace face (linen's :class:`braintrace_flax.ETPLRUCell` and
    Equinox's :class:`braintrace_eqx.ETPLRUCell` compute the same equations with the
    same parameters; the math is :mod:`braintrace.lru`). ``hidden_features`` complex
    units ``h = re + i im``, carry ``(re, im)``::

        u   = x @ W + b                      (ETPLinear 'input', 2 * hidden outputs)
        u   = u * sigmoid(x @ W_g + b_g)     (ETPLinear 'gate'; only when gated=True)
        |l| = exp(-exp(nu_log))              (ETPElemwise 'nu')
        arg = exp(theta_log)                 (ETPElemwise 'theta')
        h_t = |l| e^(i arg) h_{t-1} + sqrt(1 - |l|^2) (u_re + i u_im)
        y_t = layer_norm([re_t, im_t])       (no parameters; normalize=False: [re, im])

    One layer is in braintrace's exact class (D-RTRL's gradient equals BPTT's);
    stacked, the top layer stays exact and the lower ones are approximate
    (``docs/algorithms.md``, "The LRU cell"). ``Param`` s: ``input.kernel (in, 2H)``,
    ``input.bias``, ``gate.*`` (gated), ``nu.weight``, ``theta.weight`` ``(H,)``.

    Parameters
    ----------
    in_features, hidden_features : int
        Input size and complex units ``H`` (the output has ``2 H`` features).
    r_min, r_max : float
        The ring of initial eigenvalue magnitudes, ``0 <= r_min < r_max < 1``.
    max_phase : float
        Largest initial phase (radians).
    gated, normalize, use_bias : bool
        A sigmoid-gated drive; a layer-normalised output; biases on the projections.
    kernel_init, bias_init : initializer
        Of the input projection (default: variance ``1 / (2 in)``, the LRU paper's);
        the gate uses ``nnx.Linear``'s defaults.
    dtype, param_dtype : dtype
        As ``nnx.Linear``'s.
    rngs : nnx.Rngs
        Initialisation keys.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from braintrace_flax import nnx as btnnx
    >>> cell = btnnx.ETPLRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 3))
    >>> (re, im), y = cell(cell.initialize_carry(x.shape), x)
    >>> y.shape, cell.nu.weight.shape
    ((2, 8), (4,))
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        *,
        r_min: float = 0.5,
        r_max: float = 0.99,
        max_phase: float = lru.DEFAULT_MAX_PHASE,
        gated: bool = False,
        normalize: bool = True,
        use_bias: bool = True,
        kernel_init: Callable[..., Array] = _LRU_KERNEL_INIT,
        bias_init: Callable[..., Array] = _DEFAULT_BIAS_INIT,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        lru.check_ring(r_min, r_max, max_phase, f"ETPLRUCell({in_features}, {hidden_features})")
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.normalize = bool(normalize)
        self.param_dtype = param_dtype
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input = ETPLinear(
            in_features, 2 * hidden_features, kernel_init=kernel_init, bias_init=bias_init, **dense
        )
        self.gate = ETPLinear(in_features, 2 * hidden_features, **dense) if gated else None
        shape = (hidden_features,)
        self.nu = ETPElemwise(
            shape, lru.nu_log_init(r_min, r_max), lru.magnitude, rngs=rngs, param_dtype=param_dtype
        )
        self.theta = ETPElemwise(
            shape, lru.theta_log_init(max_phase), lru.phase, rngs=rngs, param_dtype=param_dtype
        )

    def __call__(self, carry: tuple[Array, Array], inputs: Array):
        """One step: ``((re_t, im_t), y_t)``."""
        gate = self.gate(inputs) if self.gate is not None else None
        drive = lru.split_drive(self.input(inputs), gate)
        re, im = lru.lru_step(*carry, *drive, self.nu(), self.theta())
        return (re, im), lru.lru_output(re, im, self.normalize)

    def initialize_carry(
        self,
        input_shape: tuple[int, ...],
        rngs: Any = None,
        carry_init: Callable[..., Array] | None = None,
    ):
        """``(re, im)``, each ``input_shape[:-1] + (hidden_features,)`` (zeros by default)."""
        return _pair_carry(self, "ETPLRUCell", input_shape, rngs, carry_init)

    @property
    def num_feature_axes(self) -> int:
        return 1
