"""Shared test setup: float64 is enabled for the whole suite.

With x64 on, ``jnp.ones(...)`` defaults to float64, so tests that mean float32 say so.
"""

import jax

jax.config.update("jax_enable_x64", True)
