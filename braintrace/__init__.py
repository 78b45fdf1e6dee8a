"""braintrace: online training of recurrent JAX models by eligibility traces.

The core is framework-agnostic; ``braintrace_flax`` and ``braintrace_eqx`` are the
Flax and Equinox faces.
"""

from . import algorithms, compiler, contract, lru, ops, parallel, registry, surrogate
from .algorithms import (
    ALGORITHM_NAMES,
    BPTT,
    D_RTRL,
    ES_D_RTRL,
    RTRL,
    UORO,
    Algorithm,
    DRTRLTraces,
    Learner,
    LearnerState,
    NoTraces,
    OneStep,
    OnlineAlgorithm,
    PPTraces,
    RTRLTraces,
    SnAp1,
    UOROTraces,
    algorithm_by_name,
    compile,
    pp_prop,
)
from .compiler import CompileError, CompileReport, TruncationWarning, compile_graph
from .primitive import ETPIdentityWarning, ETPPrimitive, register_primitive
from .surrogate import spike

__version__ = "0.1.0"

__all__ = [
    "ETPPrimitive",
    "ETPIdentityWarning",
    "register_primitive",
    "ops",
    "registry",
    "contract",
    "compiler",
    "algorithms",
    "compile_graph",
    "CompileError",
    "TruncationWarning",
    "CompileReport",
    "compile",
    "Learner",
    "LearnerState",
    "Algorithm",
    "OnlineAlgorithm",
    "D_RTRL",
    "ES_D_RTRL",
    "pp_prop",
    "BPTT",
    "OneStep",
    "NoTraces",
    "DRTRLTraces",
    "PPTraces",
    "SnAp1",
    "RTRL",
    "UORO",
    "RTRLTraces",
    "UOROTraces",
    "ALGORITHM_NAMES",
    "algorithm_by_name",
    "spike",
    "surrogate",
    "lru",
    "parallel",
]
