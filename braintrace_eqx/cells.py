"""Recurrent cells whose trainable matmuls are ETP ops, with Equinox's own parameter trees.

``ETPGRUCell`` and ``ETPLSTMCell`` are :class:`equinox.nn.GRUCell` /
:class:`equinox.nn.LSTMCell` with the same fields in the same order (the fused
``weight_ih`` ``(3 * hidden, input)``, ``weight_hh``, ``bias``, ...), the same
initialisation for the same key, call convention (``h = cell(x, h)``;
``(h, c) = cell(x, (h, c))``) and output. Each fused kernel is the operand of one ETP
dense op; the gates are slices of the op's *output*, never of the parameter, so the
compiler can follow each gate to the hidden state (index maps) and a checkpoint,
an optimizer state or ``eqx.tree_at`` path of the Equinox cell fits the ETP cell.
:func:`~braintrace_eqx.from_eqx` / :func:`~braintrace_eqx.to_eqx` convert.

``ETPLIFCell`` is the leaky integrate-and-fire neuron of every braintrace face
(linen's and NNX's ``ETPLIFCell`` are the same equations with the same parameters), and
``ETPLRUCell`` its linear recurrent unit (complex diagonal recurrence, exact for D-RTRL).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from braintrace import lru, ops
from braintrace.surrogate import decay_logit, lif_step, spike

from ._util import check_input, promote, rebuild
from .layers import ETPElemwise, ETPLinear

__all__ = ["ETPGRUCell", "ETPLSTMCell", "ETPLIFCell", "ETPLRUCell"]


def _mv(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``weight @ x + bias`` (Equinox layout) as one ETP dense op."""
    x, dtype = promote(x, weight)
    return ops.dense(x, weight, bias, weight_layout="out_in", dtype=dtype)


def _gates(y: Array, n: int) -> list[Array]:
    """The ``n`` gate blocks of a fused op output ``(..., n * hidden)``."""
    return jnp.split(y, n, axis=-1)


def _check_state(where: str, name: str, h: Array, size: int) -> None:
    if jnp.shape(h)[-1:] != (size,) or jnp.ndim(h) not in (1, 2):
        raise ValueError(
            f"{where}: {name} must have shape ({size},) for one sample (or (batch, {size})); "
            f"got {tuple(jnp.shape(h))}."
        )


def _check_pair(where: str, hidden: Any, names: tuple[str, str], size: int) -> None:
    if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
        raise TypeError(
            f"{where}: hidden must be the pair ({names[0]}, {names[1]}), got "
            f"{type(hidden).__name__}."
        )
    for k, name in enumerate(names):
        _check_state(where, f"hidden[{k}] ({name})", hidden[k], size)


class ETPGRUCell(eqx.Module):
    """ETP twin of :class:`equinox.nn.GRUCell`: ``h = cell(x, h)``, Equinox's tree.

    Fields as Equinox's: ``weight_ih (3 * hidden, input)`` and ``weight_hh (3 * hidden,
    hidden)`` (gates reset, update, new), ``bias (3 * hidden,)`` and ``bias_n
    (hidden,)`` (``None`` without bias). ``weight_ih``/``bias`` and ``weight_hh`` each
    feed one ETP dense op whose output is split into the gates; ``bias_n`` goes through
    the elementwise ETP op. Same initialisation as Equinox for the same key, same
    output.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> cell = bte.ETPGRUCell(3, 4, key=key)
    >>> ref = eqx.nn.GRUCell(3, 4, key=key)
    >>> x, h = jnp.ones(3), jnp.zeros(4)
    >>> bool(jnp.allclose(cell(x, h), ref(x, h))), cell.weight_ih.shape
    (True, (12, 3))
    """

    weight_ih: Array
    weight_hh: Array
    bias: Array | None
    bias_n: Array | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self, input_size: int, hidden_size: int, use_bias: bool = True, dtype=None, *, key: Array
    ):
        ref = eqx.nn.GRUCell(input_size, hidden_size, use_bias, dtype, key=key)
        self.weight_ih, self.weight_hh = ref.weight_ih, ref.weight_hh
        self.bias, self.bias_n = ref.bias, ref.bias_n
        self.input_size, self.hidden_size, self.use_bias = input_size, hidden_size, use_bias

    def __call__(self, input: Array, hidden: Array, *, key: Array | None = None) -> Array:
        """One GRU step (Equinox's equations); returns the new hidden ``(hidden_size,)``."""
        del key
        where = f"braintrace_eqx.ETPGRUCell({self.input_size}, {self.hidden_size})"
        check_input(where, "input", input, self.input_size)
        _check_state(where, "hidden", hidden, self.hidden_size)
        i_r, i_z, i_n = _gates(_mv(input, self.weight_ih, self.bias), 3)
        h_r, h_z, h_n = _gates(_mv(hidden, self.weight_hh), 3)
        if self.bias_n is not None:
            h_n = h_n + ops.elemwise(self.bias_n)
        reset = jax.nn.sigmoid(i_r + h_r)
        inp = jax.nn.sigmoid(i_z + h_z)
        new = jnp.tanh(i_n + reset * h_n)
        return new + inp * (hidden - new)

    @classmethod
    def from_eqx(cls, cell: eqx.nn.GRUCell) -> ETPGRUCell:
        """The ETP twin of a (trained) :class:`equinox.nn.GRUCell`: the same arrays."""
        if not isinstance(cell, eqx.nn.GRUCell):
            raise TypeError(
                f"braintrace_eqx.ETPGRUCell.from_eqx expects an equinox.nn.GRUCell, got "
                f"{type(cell).__name__}."
            )
        return rebuild(
            cls, cell, cell.input_size, cell.hidden_size, cell.use_bias, cell.weight_ih.dtype
        )

    def to_eqx(self) -> eqx.nn.GRUCell:
        """The :class:`equinox.nn.GRUCell` with the same arrays."""
        return rebuild(
            eqx.nn.GRUCell,
            self,
            self.input_size,
            self.hidden_size,
            self.use_bias,
            self.weight_ih.dtype,
        )


class ETPLSTMCell(eqx.Module):
    """ETP twin of :class:`equinox.nn.LSTMCell`: ``(h, c) = cell(x, (h, c))``, Equinox's tree.

    Fields as Equinox's: ``weight_ih (4 * hidden, input)``, ``weight_hh (4 * hidden,
    hidden)`` (gates input, forget, cell, output) and ``bias (4 * hidden,)`` or
    ``None``; two ETP dense ops whose summed output is split into the gates. Same
    initialisation as Equinox for the same key, same output.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> cell, ref = bte.ETPLSTMCell(3, 4, key=key), eqx.nn.LSTMCell(3, 4, key=key)
    >>> state = (jnp.zeros(4), jnp.zeros(4))
    >>> h, c = cell(jnp.ones(3), state)
    >>> bool(jnp.allclose(h, ref(jnp.ones(3), state)[0]))
    True
    """

    weight_ih: Array
    weight_hh: Array
    bias: Array | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self, input_size: int, hidden_size: int, use_bias: bool = True, dtype=None, *, key: Array
    ):
        ref = eqx.nn.LSTMCell(input_size, hidden_size, use_bias, dtype, key=key)
        self.weight_ih, self.weight_hh, self.bias = ref.weight_ih, ref.weight_hh, ref.bias
        self.input_size, self.hidden_size, self.use_bias = input_size, hidden_size, use_bias

    def __call__(
        self, input: Array, hidden: tuple[Array, Array], *, key: Array | None = None
    ) -> tuple[Array, Array]:
        """One LSTM step (Equinox's equations); returns ``(h, c)``."""
        del key
        where = f"braintrace_eqx.ETPLSTMCell({self.input_size}, {self.hidden_size})"
        check_input(where, "input", input, self.input_size)
        _check_pair(where, hidden, ("h", "c"), self.hidden_size)
        h, c = hidden
        lin = _mv(input, self.weight_ih, self.bias) + _mv(h, self.weight_hh)
        i, f, g, o = _gates(lin, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c)

    @classmethod
    def from_eqx(cls, cell: eqx.nn.LSTMCell) -> ETPLSTMCell:
        """The ETP twin of a (trained) :class:`equinox.nn.LSTMCell`: the same arrays."""
        if not isinstance(cell, eqx.nn.LSTMCell):
            raise TypeError(
                f"braintrace_eqx.ETPLSTMCell.from_eqx expects an equinox.nn.LSTMCell, got "
                f"{type(cell).__name__}."
            )
        return rebuild(
            cls, cell, cell.input_size, cell.hidden_size, cell.use_bias, cell.weight_ih.dtype
        )

    def to_eqx(self) -> eqx.nn.LSTMCell:
        """The :class:`equinox.nn.LSTMCell` with the same arrays."""
        return rebuild(
            eqx.nn.LSTMCell,
            self,
            self.input_size,
            self.hidden_size,
            self.use_bias,
            self.weight_ih.dtype,
        )


class ETPLIFCell(eqx.Module):
    """Leaky integrate-and-fire neurons: ``(v, i) = cell(x, (v, i))``.

    The neuron of every braintrace face (linen's and NNX's ``ETPLIFCell`` compute the
    same equations with the same parameters). Two states per neuron, the membrane
    voltage ``v`` and the synaptic current ``i``, coupled within the step::

        i_t = syn_decay * i_{t-1} + linear(x_t)                    (ETP dense op)
        a   = decay() = sigmoid(decay.weight)                       (ETP elementwise op)
        v_t = a * v_{t-1} * (1 - spike(v_{t-1} - threshold)) + (1 - a) * i_t
        s_t = spike(v_t - threshold)                                (the output: cell.spike)

    The reset (to zero) uses the previous step's spike; :func:`braintrace.spike` has a
    fast-sigmoid surrogate derivative of sharpness ``slope``. ``linear`` may be any
    layer mapping ``x`` to ``(hidden_size,)`` (e.g. an :class:`~braintrace_eqx.ETPLoRA`).
    With only external input the cell is in braintrace's exact class: D-RTRL gives
    the BPTT gradient. Trainable: ``linear.weight (hidden, input)``, ``linear.bias``,
    ``decay.weight (hidden,)`` (the logit of the membrane decay).

    Parameters
    ----------
    input_size, hidden_size : int
        Input and neuron counts.
    mem_decay : float
        Initial membrane decay ``a`` in (0, 1), the same for every neuron.
    syn_decay : float
        Fixed synaptic decay (static).
    threshold, slope : float
        Firing threshold and surrogate slope (static).
    use_bias, dtype
        As for :class:`~braintrace_eqx.ETPLinear`.
    key : Array
        Initialisation key for ``linear``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> cell = bte.ETPLIFCell(3, 4, key=jax.random.PRNGKey(0))
    >>> v, i = cell(jnp.ones(3), (jnp.zeros(4), jnp.zeros(4)))
    >>> v.shape, cell.spike((v, i)).shape
    ((4,), (4,))
    """

    linear: eqx.Module  # an ETPLinear, or any layer x -> (hidden_size,) such as an ETPLoRA
    decay: ETPElemwise
    syn_decay: float = eqx.field(static=True)
    threshold: float = eqx.field(static=True)
    slope: float = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        mem_decay: float = 0.9,
        syn_decay: float = 0.8,
        threshold: float = 1.0,
        slope: float = 4.0,
        use_bias: bool = True,
        dtype=None,
        key: Array,
    ):
        where = f"braintrace_eqx.ETPLIFCell({input_size}, {hidden_size})"
        logit = decay_logit(mem_decay, where)
        self.linear = ETPLinear(input_size, hidden_size, use_bias, dtype, key=key)
        self.decay = ETPElemwise(
            jnp.full((hidden_size,), logit, self.linear.weight.dtype), jax.nn.sigmoid
        )
        self.syn_decay = float(syn_decay)
        self.threshold = float(threshold)
        self.slope = float(slope)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(
        self, input: Array, hidden: tuple[Array, Array], *, key: Array | None = None
    ) -> tuple[Array, Array]:
        """One step; returns the new ``(v, i)``."""
        del key
        _check_pair(
            f"braintrace_eqx.ETPLIFCell({self.input_size}, {self.hidden_size})",
            hidden,
            ("v", "i"),
            self.hidden_size,
        )
        v, i = hidden
        return lif_step(
            v,
            i,
            self.linear(input),
            self.decay.elem(),
            syn_decay=self.syn_decay,
            threshold=self.threshold,
            slope=self.slope,
        )

    def spike(self, hidden: tuple[Array, Array]) -> Array:
        """The spikes ``s = spike(v - threshold)`` of a state ``(v, i)``: the cell's output."""
        return spike(hidden[0] - self.threshold, self.slope)


class ETPLRUCell(eqx.Module):
    """A linear recurrent unit (LRU) layer: ``(re, im) = cell(x, (re, im))``, exact for D-RTRL.

    The layer of every braintrace face (linen's and NNX's ``ETPLRUCell`` compute the
    same equations with the same parameters; the math is :mod:`braintrace.lru`).
    ``hidden_size`` complex units ``h = re + i im``::

        u   = input(x)                       (ETPLinear, 2 * hidden outputs)
        u   = u * sigmoid(gate(x))           (ETPLinear; only when gated=True)
        |l| = nu() = exp(-exp(nu.weight))    (ETP elementwise op)
        arg = theta() = exp(theta.weight)    (ETP elementwise op)
        h_t = |l| e^(i arg) h_{t-1} + sqrt(1 - |l|^2) (u_re + i u_im)
        y_t = cell.output(h_t) = layer_norm([re_t, im_t])   (normalize=False: [re, im])

    One layer is in braintrace's exact class (D-RTRL's gradient equals BPTT's);
    stacked, the top layer stays exact and the lower ones are approximate
    (``docs/algorithms.md``, "The LRU cell"). Trainable: ``input.weight (2H, in)``
    (Equinox's layout), ``input.bias``, ``gate.*`` (gated), ``nu.weight`` and
    ``theta.weight`` ``(H,)``.

    Parameters
    ----------
    input_size, hidden_size : int
        Input size and complex units ``H`` (the output has ``2 H`` features).
    r_min, r_max : float
        The ring of initial eigenvalue magnitudes, ``0 <= r_min < r_max < 1``.
    max_phase : float
        Largest initial phase (radians).
    gated, normalize, use_bias : bool
        A sigmoid-gated drive; a layer-normalised output; biases on the projections.
    dtype : dtype, optional
        Parameter dtype (Equinox's default floating dtype if ``None``).
    key : Array
        Initialisation key. The input weight is normal with variance ``1 / (2 in)``
        (the LRU paper's), the gate ``eqx.nn.Linear``'s.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> cell = bte.ETPLRUCell(3, 4, key=jax.random.PRNGKey(0))
    >>> hidden = cell(jnp.ones(3), (jnp.zeros(4), jnp.zeros(4)))
    >>> cell.output(hidden).shape, cell.nu.weight.shape
    ((8,), (4,))
    """

    input: ETPLinear
    gate: ETPLinear | None
    nu: ETPElemwise
    theta: ETPElemwise
    normalize: bool = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        r_min: float = 0.5,
        r_max: float = 0.99,
        max_phase: float = lru.DEFAULT_MAX_PHASE,
        gated: bool = False,
        normalize: bool = True,
        use_bias: bool = True,
        dtype=None,
        key: Array,
    ):
        lru.check_ring(
            r_min, r_max, max_phase, f"braintrace_eqx.ETPLRUCell({input_size}, {hidden_size})"
        )
        k_in, k_w, k_gate, k_nu, k_theta = jax.random.split(key, 5)
        layer = ETPLinear(input_size, 2 * hidden_size, use_bias, dtype, key=k_in)
        dtype = layer.weight.dtype
        weight = jax.random.normal(k_w, layer.weight.shape, dtype) / jnp.sqrt(2.0 * input_size)
        self.input = eqx.tree_at(lambda m: m.weight, layer, weight)
        self.gate = (
            ETPLinear(input_size, 2 * hidden_size, use_bias, dtype, key=k_gate) if gated else None
        )
        shape = (hidden_size,)
        self.nu = ETPElemwise(lru.nu_log_init(r_min, r_max)(k_nu, shape, dtype), lru.magnitude)
        self.theta = ETPElemwise(lru.theta_log_init(max_phase)(k_theta, shape, dtype), lru.phase)
        self.normalize = bool(normalize)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(
        self, input: Array, hidden: tuple[Array, Array], *, key: Array | None = None
    ) -> tuple[Array, Array]:
        """One step; returns the new ``(re, im)``."""
        del key
        where = f"braintrace_eqx.ETPLRUCell({self.input_size}, {self.hidden_size})"
        check_input(where, "input", input, self.input_size)
        _check_pair(where, hidden, ("re", "im"), self.hidden_size)
        gate = self.gate(input) if self.gate is not None else None
        drive = lru.split_drive(self.input(input), gate)
        return lru.lru_step(*hidden, *drive, self.nu.elem(), self.theta.elem())

    def output(self, hidden: tuple[Array, Array]) -> Array:
        """The features ``y`` of a state ``(re, im)``: the cell's output, ``(2 H,)``."""
        return lru.lru_output(*hidden, self.normalize)
