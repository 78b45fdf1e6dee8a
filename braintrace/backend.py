"""Which code path the learner takes: the one tuned for a CPU, or the accelerators' one.

A few places choose their lowering by backend (on a CPU the trace credit loops over
the samples and the step's factors are materialised behind a conditional; on a GPU
or TPU both stay one fused reduction). The environment variable
``BRAINTRACE_ACCELERATOR_PATH=1`` makes a CPU take the accelerators' branches, so
that code runs (and is tested) without an accelerator. It is read whenever a learner
is traced: set it before the first call of a jitted function (``jax.jit`` keeps the
program it traced first for the same argument shapes).
"""

from __future__ import annotations

import os

import jax

__all__ = ["ACCELERATOR_PATH_ENV", "cpu_code_path"]

#: The environment variable that forces the accelerators' code path (``"1"``).
ACCELERATOR_PATH_ENV = "BRAINTRACE_ACCELERATOR_PATH"


def cpu_code_path() -> bool:
    """Whether to take the CPU-tuned branches: on a CPU backend, unless
    ``BRAINTRACE_ACCELERATOR_PATH=1``.

    Examples
    --------
    >>> import os
    >>> from braintrace.backend import cpu_code_path
    >>> os.environ["BRAINTRACE_ACCELERATOR_PATH"] = "1"
    >>> cpu_code_path()
    False
    >>> del os.environ["BRAINTRACE_ACCELERATOR_PATH"]
    """
    value = os.environ.get(ACCELERATOR_PATH_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(
            f"braintrace: {ACCELERATOR_PATH_ENV}={value!r}; set it to 1 (take the "
            "accelerators' code path on a CPU) or 0 / unset (the backend's own path)."
        )
    return value != "1" and jax.default_backend() == "cpu"
