"""Equinox layers backed by braintrace's ETP ops: ``ETPLinear``, ``ETPLoRA``, ``ETPElemwise``.

Each layer passes its trainable arrays *unchanged* to one ETP op, which is what
lets the braintrace compiler give them an eligibility trace. Layers act on one
sample (Equinox style: ``jax.vmap`` over a batch keeps the ops visible); a leading
batch axis on ``x`` also works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from braintrace import ops

from ._util import check_input, floating, promote, rebuild

__all__ = ["ETPLinear", "ETPLoRA", "ETPElemwise"]


class ETPLinear(eqx.Module):
    """Drop-in for :class:`equinox.nn.Linear` whose matmul is the ETP dense op.

    Same fields (``weight`` ``(out, in)``, ``bias`` ``(out,)`` or ``None``, static
    ``in_features``, ``out_features``, ``use_bias``), same initialisation for the
    same key and the same output. The ``(out, in)`` weight reaches
    :func:`braintrace.ops.dense` unchanged (``weight_layout='out_in'``), so the
    compiler can trace it.

    Parameters
    ----------
    in_features, out_features : int or 'scalar'
        Input and output sizes; ``'scalar'`` means shape ``()``.
    use_bias : bool
        Whether to add a bias.
    dtype : dtype, optional
        Parameter dtype (Equinox's default floating dtype if ``None``).
    key : Array
        Initialisation key (keyword only).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
    >>> key = jax.random.PRNGKey(0)
    >>> lin = bte.ETPLinear(3, 4, key=key)
    >>> ref = eqx.nn.Linear(3, 4, key=key)
    >>> bool(jnp.all(lin.weight == ref.weight)), lin(jnp.ones(3)).shape
    (True, (4,))
    """

    weight: Array
    bias: Array | None
    in_features: int | Literal["scalar"] = eqx.field(static=True)
    out_features: int | Literal["scalar"] = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        in_features: int | Literal["scalar"],
        out_features: int | Literal["scalar"],
        use_bias: bool = True,
        dtype=None,
        *,
        key: Array,
    ):
        ref = eqx.nn.Linear(in_features, out_features, use_bias, dtype, key=key)
        self.weight = ref.weight
        self.bias = ref.bias
        self.in_features = in_features
        self.out_features = out_features
        self.use_bias = use_bias

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """``weight @ x + bias`` through the ETP dense op.

        Parameters
        ----------
        x : Array
            ``(in_features,)`` (or ``()`` for ``'scalar'``); ``(batch, in_features)``
            is accepted too.
        key : Array, optional
            Ignored (Equinox compatibility).

        Returns
        -------
        Array
            ``(out_features,)`` (or ``()`` for ``'scalar'``).
        """
        del key
        if self.in_features == "scalar":
            if jnp.shape(x) != ():
                raise ValueError(
                    f"{self._where()}: x must have shape () for in_features='scalar', got "
                    f"{tuple(jnp.shape(x))}."
                )
            x = jnp.broadcast_to(x, (1,))
        else:
            check_input(self._where(), "x", x, self.in_features)
        x, dtype = promote(x, self.weight)
        y = ops.dense(x, self.weight, self.bias, weight_layout="out_in", dtype=dtype)
        if self.out_features == "scalar":
            y = jnp.squeeze(y, -1)
        return y

    def _where(self) -> str:
        return f"braintrace_eqx.ETPLinear({self.in_features!r}, {self.out_features!r})"

    @classmethod
    def from_eqx(cls, linear: eqx.nn.Linear) -> ETPLinear:
        """The ETP twin of an :class:`equinox.nn.Linear` (same arrays)."""
        if not isinstance(linear, eqx.nn.Linear):
            raise TypeError(
                f"braintrace_eqx.ETPLinear.from_eqx expects an equinox.nn.Linear, got "
                f"{type(linear).__name__}."
            )
        return rebuild(
            cls,
            linear,
            linear.in_features,
            linear.out_features,
            linear.use_bias,
            linear.weight.dtype,
        )

    def to_eqx(self) -> eqx.nn.Linear:
        """The plain :class:`equinox.nn.Linear` with the same arrays."""
        return rebuild(
            eqx.nn.Linear,
            self,
            self.in_features,
            self.out_features,
            self.use_bias,
            self.weight.dtype,
        )


class ETPLoRA(eqx.Module):
    """Low-rank adapted linear layer through the ETP LoRA op.

    ``y = base_weight @ x + scale * lora_b.T @ (lora_a.T @ x) + bias``, i.e. the
    effective ``(in, out)`` kernel is ``base_weight.T + scale * lora_a @ lora_b``.

    ``lora_a`` ``(in, r)``, ``lora_b`` ``(r, out)`` and ``bias`` are trainable.
    ``base_weight`` is an optional **frozen** ``(out, in)`` matrix (Equinox's
    layout, so ``LoRA.from_linear`` takes an ``eqx.nn.Linear``'s weight as is).
    It is listed in ``frozen_fields``: :func:`braintrace_eqx.trainable` marks it
    ``False``, so ``eqx.filter(model, braintrace_eqx.trainable(model))`` (what the
    braintrace_eqx learner differentiates, and what you give ``optax``) leaves it
    out, and the layer stops gradients into it as well.

    Parameters
    ----------
    in_features, out_features, rank : int
        Sizes of the input, the output and the low-rank update.
    scale : float
        Static scale of the low-rank update.
    use_bias : bool
        Whether to add a trainable bias (initialised to zero).
    base_weight : Array, optional
        Frozen ``(out, in)`` base matrix.
    dtype : dtype, optional
        Parameter dtype (Equinox's default floating dtype if ``None``).
    key : Array
        Initialisation key: ``lora_a`` is uniform in ``+-1/sqrt(in)``, ``lora_b`` is
        zero (the adapted layer starts equal to its base).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> lora = bte.ETPLoRA(3, 4, 2, base_weight=jnp.ones((4, 3)), key=jax.random.PRNGKey(0))
    >>> lora(jnp.ones(3)).tolist()
    [3.0, 3.0, 3.0, 3.0]
    """

    frozen_fields: ClassVar[tuple[str, ...]] = ("base_weight",)

    lora_a: Array
    lora_b: Array
    bias: Array | None
    base_weight: Array | None
    scale: float = eqx.field(static=True)
    in_features: int = eqx.field(static=True)
    out_features: int = eqx.field(static=True)
    rank: int = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        scale: float = 1.0,
        use_bias: bool = True,
        base_weight: Array | None = None,
        dtype=None,
        key: Array,
    ):
        where = f"braintrace_eqx.ETPLoRA({in_features}, {out_features}, rank={rank})"
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("rank", rank),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}.")
        if base_weight is not None:
            base_weight = floating(where, "base_weight", base_weight)
            if base_weight.shape != (out_features, in_features):
                raise ValueError(
                    f"{where}: base_weight must be (out, in) = ({out_features}, {in_features}) "
                    f"(Equinox layout), got {tuple(base_weight.shape)}; pass W.T for an "
                    "(in, out) kernel."
                )
            if dtype is None:
                dtype = base_weight.dtype
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        lim = 1.0 / math.sqrt(in_features)
        self.lora_a = jax.random.uniform(key, (in_features, rank), dtype, -lim, lim)
        self.lora_b = jnp.zeros((rank, out_features), dtype)
        self.bias = jnp.zeros((out_features,), dtype) if use_bias else None
        self.base_weight = base_weight
        self.scale = float(scale)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank

    @classmethod
    def from_linear(
        cls, linear: ETPLinear | eqx.nn.Linear, rank: int, *, scale: float = 1.0, key: Array
    ) -> ETPLoRA:
        """Adapt a (trained) linear layer: its weight becomes the frozen base, its
        bias stays trainable.

        Examples
        --------
        >>> import jax, jax.numpy as jnp, equinox as eqx, braintrace_eqx as bte
        >>> lin = eqx.nn.Linear(3, 4, key=jax.random.PRNGKey(0))
        >>> lora = bte.ETPLoRA.from_linear(lin, 2, key=jax.random.PRNGKey(1))
        >>> bool(jnp.allclose(lora(jnp.ones(3)), lin(jnp.ones(3))))
        True
        """
        if not isinstance(linear, (ETPLinear, eqx.nn.Linear)) or "scalar" in (
            linear.in_features,
            linear.out_features,
        ):
            raise TypeError(
                "braintrace_eqx.ETPLoRA.from_linear expects a (braintrace_eqx or equinox.nn) "
                f"Linear with integer features, got {type(linear).__name__}."
            )
        lora = cls(
            linear.in_features,
            linear.out_features,
            rank,
            scale=scale,
            use_bias=linear.use_bias,
            base_weight=linear.weight,
            key=key,
        )
        if linear.bias is not None:
            lora = eqx.tree_at(lambda m: m.bias, lora, linear.bias)
        return lora

    def __call__(self, x: Array, *, key: Array | None = None) -> Array:
        """The adapted layer on ``x`` ``(in,)`` (or ``(batch, in)``)."""
        del key
        where = f"braintrace_eqx.ETPLoRA({self.in_features}, {self.out_features}, rank={self.rank})"
        check_input(where, "x", x, self.in_features)
        x = jnp.asarray(x).astype(self.lora_a.dtype)  # x is not trainable: cast it
        base = None
        if self.base_weight is not None:
            base = jax.lax.stop_gradient(self.base_weight).T.astype(self.lora_a.dtype)
        return ops.lora(x, self.lora_a, self.lora_b, self.bias, scale=self.scale, base_weight=base)


def _identity(w: Array) -> Array:
    return w


class ETPElemwise(eqx.Module):
    """A trainable per-neuron parameter read through the ETP elementwise op.

    ``elem()`` (or calling the module) returns ``fn(weight)``; the op keeps
    ``weight`` visible to the compiler (a membrane decay, a gate bias, a threshold).

    Parameters
    ----------
    weight : Array
        The trainable array (field ``weight``).
    fn : callable, optional
        An elementwise map (identity by default), e.g. ``jax.nn.sigmoid``. Pass a
        function defined once, not a new lambda per module, so ``jit`` caches stay
        warm (``fn`` is a static field).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, braintrace_eqx as bte
    >>> decay = bte.ETPElemwise(jnp.zeros(3), jax.nn.sigmoid)
    >>> decay.elem().tolist()
    [0.5, 0.5, 0.5]
    """

    weight: Array
    fn: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(self, weight: Array, fn: Callable[[Array], Array] | None = None):
        weight = floating("braintrace_eqx.ETPElemwise", "weight", weight)
        fn = _identity if fn is None else fn
        if not callable(fn):
            raise TypeError(
                f"braintrace_eqx.ETPElemwise: fn must be callable or None, got {type(fn).__name__}."
            )
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(weight.shape, weight.dtype))
        if getattr(out, "shape", None) != weight.shape:
            raise ValueError(
                f"braintrace_eqx.ETPElemwise: fn must be elementwise (output shape "
                f"{tuple(weight.shape)} like weight), got {getattr(out, 'shape', out)}."
            )
        self.weight = weight
        self.fn = fn

    def elem(self) -> Array:
        """``fn(weight)`` through :func:`braintrace.ops.elemwise`."""
        return ops.elemwise(self.weight, self.fn)

    def __call__(self, *, key: Array | None = None) -> Array:
        """Same as :meth:`elem`."""
        del key
        return self.elem()
