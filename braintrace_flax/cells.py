"""Ready linen cells built from ETP layers: ``carry, y = cell(carry, x)``.

- :class:`ETPLIFCell`: the leaky integrate-and-fire neuron of every braintrace face,
  two states (voltage, current), trainable membrane decay, surrogate-gradient spikes.
- :class:`ETPGRUCell`, :class:`ETPLSTMCell`: ``nn.GRUCell`` / ``nn.LSTMCell`` with
  every gate kernel behind an ETP dense op; same fields, parameters and outputs.
- :class:`ETPLRUCell`: the linear recurrent unit of every braintrace face (complex
  diagonal recurrence, carry ``(re, im)``), in which D-RTRL is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from braintrace import lru
from braintrace.surrogate import decay_logit, lif_step, spike

from .layers import ETPDense, ETPElemwise, autoname_like

__all__ = [
    "spike",
    "ExpDecay",
    "ETPLIFCell",
    "LIFCell",
    "ETPGRUCell",
    "ETPLSTMCell",
    "ETPLRUCell",
    "gru_forward",
    "lstm_forward",
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


class ETPLIFCell(nn.RNNCellBase):
    r"""Leaky integrate-and-fire neurons with a trainable membrane decay.

    The neuron of every braintrace face (NNX's :class:`braintrace_flax.nnx.ETPLIFCell`
    and Equinox's :class:`braintrace_eqx.ETPLIFCell` compute the same equations with
    the same parameters). Two states per neuron, the membrane voltage ``v`` and the
    synaptic current ``i`` (carry ``(v, i)``); the output is the spike ``s_t``::

        i_t = syn_decay * i_{t-1} + x_t @ W + b                    (ETPDense 'linear')
        a   = sigmoid(decay.weight)                                 (ETPElemwise 'decay')
        v_t = a * v_{t-1} * (1 - spike(v_{t-1} - threshold)) + (1 - a) * i_t
        s_t = spike(v_t - threshold)

    ``spike`` is :func:`braintrace.spike` (surrogate sharpness ``slope``); the reset
    (to zero) uses the previous step's spike. With no recurrent weights the cell is in
    braintrace's exact class: D-RTRL's gradient equals BPTT's. Parameters:
    ``linear/kernel (in, features)``, ``linear/bias``, ``decay/weight (features,)``
    (the logit of the membrane decay).

    Attributes
    ----------
    features : int
        Number of neurons.
    mem_decay : float
        Initial membrane decay ``a`` in (0, 1), the same for every neuron.
    syn_decay : float
        Fixed synaptic decay.
    threshold, slope : float
        Firing threshold and surrogate slope.
    use_bias : bool
        Bias on the input current.
    kernel_init, bias_init : initializer
        For ``linear`` (``nn.Dense``'s defaults).
    dtype, param_dtype : dtype
        As ``nn.Dense``'s.
    carry_init : initializer
        For ``initialize_carry``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPLIFCell
    >>> cell = ETPLIFCell(4)
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
    >>> v = cell.init(jax.random.key(1), carry, x)
    >>> (u, i), s = cell.apply(v, carry, x)
    >>> s.shape, sorted(v['params'])
    ((2, 4), ['decay', 'linear'])
    """

    features: int
    mem_decay: float = 0.9
    syn_decay: float = 0.8
    threshold: float = 1.0
    slope: float = 4.0
    use_bias: bool = True
    kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Callable[..., Array] = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array):
        """One step: ``((v_t, i_t), s_t)``."""
        logit = decay_logit(self.mem_decay, "ETPLIFCell")
        v, i = carry
        drive = ETPDense(
            self.features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            name="linear",
        )(inputs)
        a = ETPElemwise(
            (self.features,),
            nn.initializers.constant(logit),
            jax.nn.sigmoid,
            self.param_dtype,
            name="decay",
        )()
        v, i = lif_step(
            v, i, drive, a, syn_decay=self.syn_decay, threshold=self.threshold, slope=self.slope
        )
        return (v, i), spike(v - self.threshold, self.slope)

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]):
        """Zero voltage and current: ``(v, i)``, each ``input_shape[:-1] + (features,)``."""
        k1, k2 = jax.random.split(rng)
        shape = tuple(input_shape[:-1]) + (self.features,)
        return (
            self.carry_init(k1, shape, self.param_dtype),
            self.carry_init(k2, shape, self.param_dtype),
        )

    @property
    def num_feature_axes(self) -> int:
        return 1


#: The first release's name of :class:`ETPLIFCell` (documented then), kept as an alias.
LIFCell = ETPLIFCell


def gru_forward(cell: nn.Module, carry: Array, inputs: Array):
    """``nn.GRUCell``'s equations with ETP dense layers (called in a compact method)."""
    h = carry
    n = h.shape[-1]

    def dense(name, use_bias, kernel_init):
        return ETPDense(
            n,
            use_bias=use_bias,
            dtype=cell.dtype,
            param_dtype=cell.param_dtype,
            kernel_init=kernel_init,
            bias_init=cell.bias_init,
            name=name,
        )

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
        x_part = ETPDense(
            n,
            use_bias=False,
            dtype=cell.dtype,
            param_dtype=cell.param_dtype,
            kernel_init=cell.kernel_init,
            name="i" + name,
        )(inputs)
        h_part = ETPDense(
            n,
            use_bias=True,
            dtype=cell.dtype,
            param_dtype=cell.param_dtype,
            kernel_init=cell.recurrent_kernel_init,
            bias_init=cell.bias_init,
            name="h" + name,
        )(h)
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


class ETPLRUCell(nn.RNNCellBase):
    r"""A linear recurrent unit (LRU) layer: complex diagonal recurrence, exact for D-RTRL.

    The layer of every braintrace face (NNX's :class:`braintrace_flax.nnx.ETPLRUCell`
    and Equinox's :class:`braintrace_eqx.ETPLRUCell` compute the same equations with
    the same parameters; the math is :mod:`braintrace.lru`). ``features`` complex units
    ``h = re + i im``, carry ``(re, im)``::

        u   = x @ W + b                      (ETPDense 'input', 2 * features outputs)
        u   = u * sigmoid(x @ W_g + b_g)     (ETPDense 'gate'; only when gated=True)
        |l| = exp(-exp(nu_log))              (ETPElemwise 'nu')
        arg = exp(theta_log)                 (ETPElemwise 'theta')
        h_t = |l| e^(i arg) h_{t-1} + sqrt(1 - |l|^2) (u_re + i u_im)
        y_t = layer_norm([re_t, im_t])       (no parameters; normalize=False: [re, im])

    Every parameter reaches the state through ETP ops and no op reads the state, so
    one layer is in braintrace's exact class: D-RTRL's gradient equals BPTT's. Stacked
    (one cell's ``y`` the next one's ``x``), the top layer stays exact and the lower
    ones are approximate (``docs/algorithms.md``, "The LRU cell"). The eigenvalue
    magnitudes start uniform on the ring ``r_min <= |l| <= r_max`` and the phases in
    ``(0, max_phase]``. Parameters: ``input/kernel (in, 2 features)``, ``input/bias``,
    ``gate/...`` (gated), ``nu/weight``, ``theta/weight`` ``(features,)``.

    Attributes
    ----------
    features : int
        Complex units ``H``; the output has ``2 H`` features.
    r_min, r_max : float
        The ring of initial eigenvalue magnitudes, ``0 <= r_min < r_max < 1``.
    max_phase : float
        Largest initial phase (radians).
    gated : bool
        Multiply the drive by a sigmoid gate of the input (a GLU drive).
    normalize : bool
        Layer-normalise the output.
    use_bias : bool
        Biases on the input (and gate) projection.
    kernel_init, bias_init : initializer
        Of the input projection (default: variance ``1 / (2 in)``, the LRU paper's);
        the gate uses ``nn.Dense``'s defaults.
    dtype, param_dtype : dtype
        As ``nn.Dense``'s.
    carry_init : initializer
        For ``initialize_carry``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from braintrace_flax import ETPLRUCell
    >>> cell = ETPLRUCell(4)
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(jax.random.key(0), x.shape)
    >>> v = cell.init(jax.random.key(1), carry, x)
    >>> (re, im), y = cell.apply(v, carry, x)
    >>> y.shape, sorted(v['params'])
    ((2, 8), ['input', 'nu', 'theta'])
    """

    features: int
    r_min: float = 0.5
    r_max: float = 0.99
    max_phase: float = lru.DEFAULT_MAX_PHASE
    gated: bool = False
    normalize: bool = True
    use_bias: bool = True
    kernel_init: Callable[..., Array] = nn.initializers.variance_scaling(0.5, "fan_in", "normal")
    bias_init: Callable[..., Array] = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    carry_init: Callable[..., Array] = nn.initializers.zeros_init()

    def _dense(self, name: str, kernel_init: Callable[..., Array]) -> ETPDense:
        return ETPDense(
            2 * self.features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kernel_init,
            bias_init=self.bias_init,
            name=name,
        )

    @nn.compact
    def __call__(self, carry: tuple[Array, Array], inputs: Array):
        """One step: ``((re_t, im_t), y_t)``."""
        lru.check_ring(self.r_min, self.r_max, self.max_phase, f"ETPLRUCell({self.features})")
        re, im = carry
        u = self._dense("input", self.kernel_init)(inputs)
        gate = self._dense("gate", nn.initializers.lecun_normal())(inputs) if self.gated else None
        shape = (self.features,)
        mag = ETPElemwise(
            shape,
            lru.nu_log_init(self.r_min, self.r_max),
            lru.magnitude,
            self.param_dtype,
            name="nu",
        )()
        arg = ETPElemwise(
            shape, lru.theta_log_init(self.max_phase), lru.phase, self.param_dtype, name="theta"
        )()
        re, im = lru.lru_step(re, im, *lru.split_drive(u, gate), mag, arg)
        return (re, im), lru.lru_output(re, im, self.normalize)

    @nn.nowrap
    def initialize_carry(self, rng: jax.Array, input_shape: tuple[int, ...]):
        """Zero state: ``(re, im)``, each ``input_shape[:-1] + (features,)``."""
        k1, k2 = jax.random.split(rng)
        shape = tuple(input_shape[:-1]) + (self.features,)
        return (
            self.carry_init(k1, shape, self.param_dtype),
            self.carry_init(k2, shape, self.param_dtype),
        )

    @property
    def num_feature_axes(self) -> int:
        return 1
