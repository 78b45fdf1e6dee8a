"""Ready linen cells built from ETP layers: ``carry, y = cell(carry, x)``.

- :class:`LIFCell`: leaky integrate-and-fire neuron, two states (current, voltage),
  trainable membrane time constant, surrogate-gradient spikes.
- :class:`ETPGRUCell`, :class:`ETPLSTMCell`: ``nn.GRUCell`` / ``nn.LSTMCell`` with
  every gate kernel behind an ETP dense op; same fields, parameters and outputs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from braintrace.surrogate import spike

from .layers import ETPDense, ETPElemwise, autoname_like

__all__ = [
    "spike", "ExpDecay", "LIFCell", "ETPGRUCell", "ETPLSTMCell", "gru_forward", "lstm_forward",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ExpDecay:
    """``tau -> exp(-dt / tau)``: the per-step decay of a time constant ``tau``.

    A hashable callable (equal instances are equal), so passing it as the ``fn`` of
    an elementwise op keeps jit caches warm.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from braintrace_flax import ExpDecay
    >>> round(float(ExpDecay(dt=1.0)(jnp.array(1.0))), 4)
    0.3679
    """

    dt: float = 1.0

    def __call__(self, tau: Array) -> Array:
        return jnp.exp(-self.dt / tau)


class LIFCell(nn.RNNCellBase):
    r"""Leaky integrate-and-fire cell with a trainable membrane time constant.

    Two states per neuron, the synaptic current ``i`` and the membrane voltage ``v``
    (carry ``(i, v)``); the spike output uses :func:`spike`'s surrogate derivative::

        alpha = exp(-dt / tau_mem)                     (tau_mem trainable, per neuron)
        beta  = exp(-dt / tau_syn)                     (fixed)
        i_t   = beta * i_{t-1} + W x_t + b             (ETPDense 'input')
        s_{t-1} = H(v_{t-1} - theta)
        v_t   = alpha * (v_{t-1} - theta * s_{t-1}) + (1 - alpha) * i_t
        y_t   = s_t = H(v_t - theta)

    ``v_t`` reads this step's ``i_t`` (same-step coupling); reset is by subtraction.
    With no recurrent weights it is in braintrace's exact class: D-RTRL's gradient
    equals BPTT's. Parameters: ``input/kernel``, ``input/bias``, ``tau_mem/weight``.

    Attributes
    ----------
    features : int
        Number of neurons.
    tau_mem : float
        Initial membrane time constant, in units of ``dt`` (trainable; keep it > 0).
    tau_syn : float
        Synaptic time constant (fixed).
    threshold : float
        Firing threshold ``theta``.
    dt : float
        Time step.
    use_bias : bool
        Bias on the input current.
    kernel_init, bias_init : initializer
        For the input kernel and bias (``nn.Dense``'s defaults).
    spike_fn : callable
        Spike nonlinearity with a surrogate derivative.
    dtype, param_dtype : dtype
        As ``nn.Dense``'s.
    carry_init : initializer
        For ``initialize_carry``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import LIFCell
    >>> cell = LIFCell(4)
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
    >>> v = cell.init(jax.random.key(1), carry, x)
    >>> (i, u), s = cell.apply(v, carry, x)
    >>> s.shape, sorted(v['params'])
    ((2, 4), ['input', 'tau_mem'])
    """

    features: int
    tau_mem: float = 10.0
    tau_syn: float = 5.0
    threshold: float = 1.0
    dt: float = 1.0
    use_bias: bool = True
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    spike_fn: Callable[[Array], Array] = spike
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Callable[..., Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array):
        """One step: ``((i_t, v_t), s_t)``."""
        i, v = carry
        alpha = ETPElemwise(
            (self.features,), nn.initializers.constant(self.tau_mem), ExpDecay(self.dt),
            self.param_dtype, name="tau_mem",
        )()
        beta = math.exp(-self.dt / self.tau_syn)
        drive = ETPDense(
            self.features, use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=self.kernel_init,
            bias_init=self.bias_init, name="input",
        )(inputs)
        i = beta * i + drive
        v = alpha * (v - self.threshold * self.spike_fn(v - self.threshold)) + (1.0 - alpha) * i
        s = self.spike_fn(v - self.threshold)
        return (i, v), s

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]):
        """Zero current and voltage: ``(i, v)``, each ``input_shape[:-1] + (features,)``."""
        k1, k2 = jax.random.split(rng)
        shape = tuple(input_shape[:-1]) + (self.features,)
        return (self.carry_init(k1, shape, self.param_dtype),
                self.carry_init(k2, shape, self.param_dtype))

    @property
    def num_feature_axes(self) -> int:
        return 1


def gru_forward(cell: nn.Module, carry: Array, inputs: Array):
    """``nn.GRUCell``'s equations with ETP dense layers (called in a compact method)."""
    h = carry
    n = h.shape[-1]

    def dense(name, use_bias, kernel_init):
        return ETPDense(n, use_bias=use_bias, dtype=cell.dtype, param_dtype=cell.param_dtype,
                        kernel_init=kernel_init, bias_init=cell.bias_init, name=name)

    def dense_i(name):
        return dense(name, True, cell.kernel_init)(inputs)

    def dense_h(name, use_bias=False):
        return dense(name, use_bias, cell.recurrent_kernel_init)(h)

    r = cell.gate_fn(dense_i("ir") + dense_h("hr"))
    z = cell.gate_fn(dense_i("iz") + dense_h("hz"))
    c = cell.activation_fn(dense_i("in") + r * dense_h("hn", use_bias=True))
    new_h = (1.0 - z) * c + z * h
    return new_h, new_h


def lstm_forward(cell: nn.Module, carry: tuple[Array, Array], inputs: Array):
    """``nn.LSTMCell``'s equations with ETP dense layers (called in a compact method).

    Works for any module with ``nn.LSTMCell``'s fields (``nn.OptimizedLSTMCell`` too:
    its parameter tree is the same).
    """
    c, h = carry
    n = h.shape[-1]

    def gate(name):
        x_part = ETPDense(n, use_bias=False, dtype=cell.dtype, param_dtype=cell.param_dtype,
                          kernel_init=cell.kernel_init, name="i" + name)(inputs)
        h_part = ETPDense(n, use_bias=True, dtype=cell.dtype, param_dtype=cell.param_dtype,
                          kernel_init=cell.recurrent_kernel_init, bias_init=cell.bias_init,
                          name="h" + name)(h)
        return x_part + h_part

    i = cell.gate_fn(gate("i"))
    f = cell.gate_fn(gate("f"))
    g = cell.activation_fn(gate("g"))
    o = cell.gate_fn(gate("o"))
    new_c = f * c + i * g
    new_h = o * cell.activation_fn(new_c)
    return (new_c, new_h), new_h


class ETPGRUCell(nn.GRUCell):
    r"""``nn.GRUCell`` with every gate kernel behind an ETP dense op.

    Same fields, parameters (``ir, iz, in`` with bias; ``hr, hz`` without; ``hn``
    with), initialisers and outputs as ``nn.GRUCell``::

        r  = sigmoid(W_ir x + b_ir + W_hr h)
        z  = sigmoid(W_iz x + b_iz + W_hz h)
        n  = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    The recurrent kernels make it an approximate-class model for D-RTRL / pp_prop
    (the diagonal approximation cuts the ``h -> W_h h`` path in the trace).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from braintrace_flax import ETPGRUCell
    >>> x, h = jnp.ones((2, 3)), jnp.zeros((2, 4))
    >>> v = ETPGRUCell(4).init(jax.random.key(0), h, x)
    >>> ref = nn.GRUCell(4).apply(v, h, x)[0]
    >>> bool(jnp.allclose(ETPGRUCell(4).apply(v, h, x)[0], ref))
    True
    """

    def __post_init__(self) -> None:
        autoname_like(self, "GRUCell")
        super().__post_init__()

    @nn.compact
    def __call__(self, carry: Array, inputs: Array):
        """One GRU step: ``(h', h')``."""
        return gru_forward(self, carry, inputs)


class ETPLSTMCell(nn.LSTMCell):
    r"""``nn.LSTMCell`` with every gate kernel behind an ETP dense op.

    Same fields, parameters (``ii, if, ig, io`` without bias; ``hi, hf, hg, ho`` with),
    initialisers and outputs as ``nn.LSTMCell`` (and ``nn.OptimizedLSTMCell``); carry
    ``(c, h)``::

        i = sigmoid(W_ii x + W_hi h + b_hi)      f = sigmoid(W_if x + W_hf h + b_hf)
        g = tanh(W_ig x + W_hg h + b_hg)         o = sigmoid(W_io x + W_ho h + b_ho)
        c' = f * c + i * g                       h' = o * tanh(c')

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPLSTMCell
    >>> cell = ETPLSTMCell(4)
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
    >>> v = cell.init(jax.random.key(1), carry, x)
    >>> (c, h), y = cell.apply(v, carry, x)
    >>> y.shape
    (2, 4)
    """

    def __post_init__(self) -> None:
        autoname_like(self, "LSTMCell")
        super().__post_init__()

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array):
        """One LSTM step: ``((c', h'), h')``."""
        return lstm_forward(self, carry, inputs)
