"""Recurrent cells whose every trainable matmul is its own ETP op.

``GRUCell`` and ``LSTMCell`` have Equinox's fields, call convention
(``h = cell(x, h)``; ``(h, c) = cell(x, (h, c))``) and initialisation, with one
difference: the gate-stacked matrices are stored **per gate**. Where
``eqx.nn.GRUCell.weight_ih`` is one ``(3 * hidden, input)`` array, here it is a
tuple of three ``(hidden, input)`` arrays (reset, update, new), and likewise for
``weight_hh`` and ``bias`` (LSTM: four gates i, f, g, o). The reason: the
braintrace compiler traces an op whose output maps position by position onto the
hidden state; a slice of one stacked matmul does not (it would get only a one-step
gradient) and a slice of a stacked parameter in front of an op is refused. The
arrays are exactly Equinox's split along the gate axis: ``jnp.concatenate(
cell.weight_ih)`` is ``eqx_cell.weight_ih``; ``from_eqx`` / ``to_eqx`` convert.

``LIFCell`` is a current-based leaky integrate-and-fire neuron with a surrogate
spike, built from :class:`~braintrace_eqx.Linear` and
:class:`~braintrace_eqx.Elemwise`.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from braintrace import ops
from braintrace.surrogate import spike

from ._util import check_input, new_module, promote
from .layers import Elemwise, Linear

__all__ = ["GRUCell", "LSTMCell", "LIFCell"]


def _mv(x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``weight @ x + bias`` (Equinox layout) as one ETP dense op."""
    x, dtype = promote(x, weight)
    return ops.dense(x, weight, bias, weight_layout="out_in", dtype=dtype)


def _split(where: str, name: str, value: Array | None, gates: int) -> tuple | None:
    if value is None:
        return None
    if value.shape[0] % gates:
        raise ValueError(
            f"{where}: {name} has {value.shape[0]} rows, not a multiple of {gates} gates."
        )
    return tuple(jnp.split(value, gates))


def _join(parts: tuple | None) -> Array | None:
    return None if parts is None else jnp.concatenate(parts)


def _check_state(where: str, name: str, h: Array, size: int) -> None:
    if jnp.shape(h)[-1:] != (size,) or jnp.ndim(h) not in (1, 2):
        raise ValueError(
            f"{where}: {name} must have shape ({size},) for one sample (or (batch, {size})); "
            f"got {tuple(jnp.shape(h))}."
        )


class GRUCell(eqx.Module):
    """ETP twin of :class:`equinox.nn.GRUCell`: ``h = cell(x, h)``.

    Fields as Equinox's, stored per gate (see the module docstring):
    ``weight_ih`` (3 x ``(hidden, input)``: reset, update, new), ``weight_hh``
    (3 x ``(hidden, hidden)``), ``bias`` (3 x ``(hidden,)``) and ``bias_n``
    ``(hidden,)``; ``bias`` and ``bias_n`` are ``None`` without bias. Same
    initialisation as Equinox for the same key, same output.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> cell = bte.GRUCell(3, 4, key=key)
    >>> ref = eqx.nn.GRUCell(3, 4, key=key)
    >>> x, h = jnp.ones(3), jnp.zeros(4)
    >>> bool(jnp.allclose(cell(x, h), ref(x, h))), len(cell.weight_ih)
    (True, 3)
    >>> bte.GRUCell.from_eqx(ref).to_eqx().weight_ih.shape
    (12, 3)
    """

    weight_ih: tuple[Array, Array, Array]
    weight_hh: tuple[Array, Array, Array]
    bias: tuple[Array, Array, Array] | None
    bias_n: Array | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, use_bias: bool = True, dtype=None,
                 *, key: Array):
        ref = GRUCell.from_eqx(eqx.nn.GRUCell(input_size, hidden_size, use_bias, dtype, key=key))
        for name in ("weight_ih", "weight_hh", "bias", "bias_n", "input_size", "hidden_size",
                     "use_bias"):
            setattr(self, name, getattr(ref, name))

    def __call__(self, input: Array, hidden: Array, *, key: Array | None = None) -> Array:
        """One GRU step (Equinox's equations); returns the new hidden ``(hidden_size,)``."""
        del key
        where = f"braintrace_eqx.GRUCell({self.input_size}, {self.hidden_size})"
        check_input(where, "input", input, self.input_size)
        _check_state(where, "hidden", hidden, self.hidden_size)
        b = self.bias if self.use_bias else (None, None, None)
        wi, wh = self.weight_ih, self.weight_hh
        reset = jax.nn.sigmoid(_mv(input, wi[0], b[0]) + _mv(hidden, wh[0]))
        inp = jax.nn.sigmoid(_mv(input, wi[1], b[1]) + _mv(hidden, wh[1]))
        new = jnp.tanh(_mv(input, wi[2], b[2]) + reset * _mv(hidden, wh[2], self.bias_n))
        return new + inp * (hidden - new)

    @classmethod
    def from_eqx(cls, cell: eqx.nn.GRUCell) -> GRUCell:
        """Split a (trained) :class:`equinox.nn.GRUCell` into the per-gate ETP cell."""
        if not isinstance(cell, eqx.nn.GRUCell):
            raise TypeError(
                f"braintrace_eqx.GRUCell.from_eqx expects an equinox.nn.GRUCell, got "
                f"{type(cell).__name__}."
            )
        where = "braintrace_eqx.GRUCell.from_eqx"
        return new_module(
            cls,
            weight_ih=_split(where, "weight_ih", cell.weight_ih, 3),
            weight_hh=_split(where, "weight_hh", cell.weight_hh, 3),
            bias=_split(where, "bias", cell.bias, 3),
            bias_n=cell.bias_n,
            input_size=cell.input_size,
            hidden_size=cell.hidden_size,
            use_bias=cell.use_bias,
        )

    def to_eqx(self) -> eqx.nn.GRUCell:
        """The :class:`equinox.nn.GRUCell` with the gates stacked back."""
        return new_module(
            eqx.nn.GRUCell,
            weight_ih=_join(self.weight_ih),
            weight_hh=_join(self.weight_hh),
            bias=_join(self.bias),
            bias_n=self.bias_n,
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            use_bias=self.use_bias,
        )


class LSTMCell(eqx.Module):
    """ETP twin of :class:`equinox.nn.LSTMCell`: ``(h, c) = cell(x, (h, c))``.

    Fields as Equinox's, stored per gate (input, forget, cell, output):
    ``weight_ih`` (4 x ``(hidden, input)``), ``weight_hh`` (4 x
    ``(hidden, hidden)``), ``bias`` (4 x ``(hidden,)`` or ``None``). Same
    initialisation as Equinox for the same key, same output.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> cell, ref = bte.LSTMCell(3, 4, key=key), eqx.nn.LSTMCell(3, 4, key=key)
    >>> state = (jnp.zeros(4), jnp.zeros(4))
    >>> h, c = cell(jnp.ones(3), state)
    >>> bool(jnp.allclose(h, ref(jnp.ones(3), state)[0]))
    True
    """

    weight_ih: tuple[Array, Array, Array, Array]
    weight_hh: tuple[Array, Array, Array, Array]
    bias: tuple[Array, Array, Array, Array] | None
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, use_bias: bool = True, dtype=None,
                 *, key: Array):
        ref = LSTMCell.from_eqx(eqx.nn.LSTMCell(input_size, hidden_size, use_bias, dtype,
                                                key=key))
        for name in ("weight_ih", "weight_hh", "bias", "input_size", "hidden_size", "use_bias"):
            setattr(self, name, getattr(ref, name))

    def __call__(self, input: Array, hidden: tuple[Array, Array], *,
                 key: Array | None = None) -> tuple[Array, Array]:
        """One LSTM step (Equinox's equations); returns ``(h, c)``."""
        del key
        where = f"braintrace_eqx.LSTMCell({self.input_size}, {self.hidden_size})"
        check_input(where, "input", input, self.input_size)
        if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
            raise TypeError(
                f"{where}: hidden must be the pair (h, c), got {type(hidden).__name__}."
            )
        h, c = hidden
        _check_state(where, "hidden[0] (h)", h, self.hidden_size)
        _check_state(where, "hidden[1] (c)", c, self.hidden_size)
        b = self.bias if self.use_bias else (None,) * 4
        i, f, g, o = (_mv(input, self.weight_ih[k], b[k]) + _mv(h, self.weight_hh[k])
                      for k in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c)

    @classmethod
    def from_eqx(cls, cell: eqx.nn.LSTMCell) -> LSTMCell:
        """Split a (trained) :class:`equinox.nn.LSTMCell` into the per-gate ETP cell."""
        if not isinstance(cell, eqx.nn.LSTMCell):
            raise TypeError(
                f"braintrace_eqx.LSTMCell.from_eqx expects an equinox.nn.LSTMCell, got "
                f"{type(cell).__name__}."
            )
        where = "braintrace_eqx.LSTMCell.from_eqx"
        return new_module(
            cls,
            weight_ih=_split(where, "weight_ih", cell.weight_ih, 4),
            weight_hh=_split(where, "weight_hh", cell.weight_hh, 4),
            bias=_split(where, "bias", cell.bias, 4),
            input_size=cell.input_size,
            hidden_size=cell.hidden_size,
            use_bias=cell.use_bias,
        )

    def to_eqx(self) -> eqx.nn.LSTMCell:
        """The :class:`equinox.nn.LSTMCell` with the gates stacked back."""
        return new_module(
            eqx.nn.LSTMCell,
            weight_ih=_join(self.weight_ih),
            weight_hh=_join(self.weight_hh),
            bias=_join(self.bias),
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            use_bias=self.use_bias,
        )


class LIFCell(eqx.Module):
    """Current-based leaky integrate-and-fire neurons: ``(v, i) = cell(x, (v, i))``.

    Two states per neuron, coupled within the step::

        i' = syn_decay * i + linear(x)                       (ETP dense op)
        a  = decay.elem()        = sigmoid(decay.weight)       (ETP elementwise op)
        v' = a * v * (1 - spike(v - threshold)) + (1 - a) * i'

    The reset uses the previous step's spike, with the surrogate derivative of
    :func:`braintrace_eqx.spike`. ``linear`` may be any layer mapping ``x`` to
    ``(hidden_size,)`` (e.g. a :class:`~braintrace_eqx.LoRA`). :meth:`spike` gives
    the spikes of a state. With only external input the cell is in braintrace's
    exact class: D-RTRL gives the BPTT gradient.

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
        As for :class:`~braintrace_eqx.Linear`.
    key : Array
        Initialisation key for ``linear``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> cell = bte.LIFCell(3, 4, key=jax.random.PRNGKey(0))
    >>> v, i = cell(jnp.ones(3), (jnp.zeros(4), jnp.zeros(4)))
    >>> v.shape, cell.spike((v, i)).shape
    ((4,), (4,))
    """

    linear: eqx.Module  # a Linear, or any layer x -> (hidden_size,) such as a LoRA
    decay: Elemwise
    syn_decay: float = eqx.field(static=True)
    threshold: float = eqx.field(static=True)
    slope: float = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, input_size: int, hidden_size: int, *, mem_decay: float = 0.9,
                 syn_decay: float = 0.8, threshold: float = 1.0, slope: float = 4.0,
                 use_bias: bool = True, dtype=None, key: Array):
        where = f"braintrace_eqx.LIFCell({input_size}, {hidden_size})"
        if not 0.0 < mem_decay < 1.0:
            raise ValueError(f"{where}: mem_decay must be in (0, 1), got {mem_decay!r}.")
        self.linear = Linear(input_size, hidden_size, use_bias, dtype, key=key)
        logit = math.log(mem_decay / (1.0 - mem_decay))
        self.decay = Elemwise(jnp.full((hidden_size,), logit, self.linear.weight.dtype),
                              jax.nn.sigmoid)
        self.syn_decay = float(syn_decay)
        self.threshold = float(threshold)
        self.slope = float(slope)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(self, input: Array, hidden: tuple[Array, Array], *,
                 key: Array | None = None) -> tuple[Array, Array]:
        """One step; returns the new ``(v, i)``."""
        del key
        where = f"braintrace_eqx.LIFCell({self.input_size}, {self.hidden_size})"
        if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
            raise TypeError(
                f"{where}: hidden must be the pair (v, i), got {type(hidden).__name__}."
            )
        v, i = hidden
        _check_state(where, "hidden[0] (v)", v, self.hidden_size)
        _check_state(where, "hidden[1] (i)", i, self.hidden_size)
        i = self.syn_decay * i + self.linear(input)
        a = self.decay.elem()
        v = a * v * (1.0 - spike(v - self.threshold, self.slope)) + (1.0 - a) * i
        return (v, i)

    def spike(self, hidden: tuple[Array, Array]) -> Array:
        """Spikes ``spike(v - threshold)`` of a state ``(v, i)``."""
        return spike(hidden[0] - self.threshold, self.slope)
