"""braintrace: online training of recurrent JAX models by eligibility traces.

The core is framework-agnostic; ``braintrace_flax`` and ``braintrace_eqx`` are the
Flax and Equinox faces.
"""

from . import compiler, ops, registry
from .compiler import CompileError, compile_graph
from .primitive import ETPIdentityWarning, ETPPrimitive, register_primitive

__version__ = "0.1.0"

__all__ = [
    "ETPPrimitive",
    "ETPIdentityWarning",
    "register_primitive",
    "ops",
    "compiler",
    "compile_graph",
    "CompileError",
    "registry",
]
