"""An op's trace rules seen for ONE sample.

Rules are written for the primitive's own operand shapes: a batched primitive's
rules take a leading batch axis (and its gradient rules sum over it, as its VJP
does). The online algorithms keep one trace per sample and ``jax.vmap`` over the
batch, so they need every rule for a single sample. For a batched primitive that
is the rule applied to a batch of one; for an unbatched primitive it is the rule
itself. :class:`SampleRules` packages that, so the algorithms never special-case
batched ops and a user's batched-only primitive trains like a built-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from . import registry
from .contract import takes_params

__all__ = ["SampleRules"]


def _add_lead(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def _drop_lead(tree):
    return jax.tree_util.tree_map(lambda a: a[0], tree)


def _lead_struct(var, lead: bool):
    if var is None:
        return None
    shape = ((1,) if lead else ()) + tuple(var.shape)
    return jax.ShapeDtypeStruct(shape, var.dtype)


@dataclasses.dataclass(frozen=True)
class SampleRules:
    """Per-sample rules of one ETP equation.

    Each method calls the primitive's rule (from its
    :class:`~braintrace.contract.OpContract`) with the equation's ``params``, on
    one sample's arrays; arguments are the rules' (:mod:`braintrace.contract`).

    Parameters
    ----------
    primitive : ETPPrimitive
        The equation's primitive (registered).
    params : dict
        The equation's keyword parameters (passed to every rule).
    """

    primitive: Any
    params: Any

    @property
    def _batched(self) -> bool:
        return registry.is_batched(self.primitive)

    def _rule(self, slot: str) -> Callable:
        return registry.get_rule(self.primitive, slot)

    def init_drtrl(self, x_var, y_var, weight_var, num_states: int):
        """Zeros of one sample's D-RTRL trace (trainable shapes plus ``num_states``)."""
        return self._init("init_drtrl", x_var, y_var, weight_var, num_states)

    def init_pp(self, x_var, y_var, weight_var, num_states: int):
        """Zeros of one sample's pp_prop output-side trace (``y`` shape plus states)."""
        return self._init("init_pp", x_var, y_var, weight_var, num_states)

    def _init(self, slot, x_var, y_var, weight_var, num_states):
        lead = self._batched
        rule = self._rule(slot)
        params = self.params if takes_params(rule) else {}
        out = rule(
            _lead_struct(x_var, lead), _lead_struct(y_var, lead), weight_var, num_states, **params
        )
        return _drop_lead(out) if lead else out

    def xy_to_trace(self, x, y_cotangent, w):
        """Instantaneous D-RTRL term of one sample, in trace space."""
        slot = "xy_to_trace" if registry.has_rule(self.primitive, "xy_to_trace") else "xy_to_dw"
        return self._call_xy(slot, x, y_cotangent, w)

    def xy_to_dw(self, x, y_cotangent, w):
        """The op's VJP w.r.t. its trainables for one sample, at cotangent ``y_cotangent``."""
        return self._call_xy("xy_to_dw", x, y_cotangent, w)

    def _call_xy(self, slot, x, y_cotangent, w):
        if self._batched:
            x, y_cotangent = x[None], y_cotangent[None]
        return self._rule(slot)(x, y_cotangent, w, **self.params)

    def yw_to_w(self, output_vector, trace):
        """Scale one sample's trace along the output axis by ``output_vector``."""
        if not self._batched:
            return self._rule("yw_to_w")(output_vector, trace, **self.params)
        out = self._rule("yw_to_w")(output_vector[None], _add_lead(trace), **self.params)
        return _drop_lead(out)

    def trace_to_dw(self, dtrace, w):
        """Map a contracted (batch-summed) trace to ``dw`` (identity by default)."""
        if not registry.has_rule(self.primitive, "trace_to_dw"):
            return dtrace
        return self._rule("trace_to_dw")(dtrace, w, **self.params)
