"""Warnings that point at the user's line, not at braintrace's or a framework's.

A warning raised deep inside the library (while ``learner.init`` compiles, or while
JAX traces an op under ``vmap``) is only useful if Python reports the line of the
user's code that led to it. The number of library frames in between depends on the
entry point (the core learner, a Flax or Equinox face, a JAX transformation), so the
``stacklevel`` is counted at run time.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_at_user"]

#: Top-level packages whose frames are skipped (``braintrace_flax`` and
#: ``braintrace_eqx`` are matched by the ``braintrace`` prefix).
_LIBRARIES = ("braintrace", "jax", "jaxlib", "flax", "equinox")


def _is_library(module: str) -> bool:
    top = module.split(".", 1)[0]
    return top.startswith(_LIBRARIES[0]) or top in _LIBRARIES[1:]


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the innermost frame outside the libraries, for a
    ``warnings.warn`` called from this module's caller's caller."""
    frame, level = sys._getframe(2), 1  # the function that called warn_at_user
    while frame is not None and _is_library(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 1


def warn_at_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the user's code."""
    warnings.warn(message, category, stacklevel=_user_stacklevel() + 1)
