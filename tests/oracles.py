"""Test-only comparisons; the gradient references live in ``braintrace.testing.reference``."""

from __future__ import annotations

import jax.numpy as jnp


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (``b`` the reference; both non-zero is asserted)."""
    scale = float(jnp.abs(b).max())
    assert scale > 0, "reference gradient is zero: the comparison would prove nothing"
    return float(jnp.abs(a - b).max()) / scale
