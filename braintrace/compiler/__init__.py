"""The compiler: from a step function's jaxpr to the eligibility-trace graph.

Layers, bottom up: ``program`` (trace and flatten the jaxpr), ``paths`` (which
value reaches which, position-preservingly), ``reach`` (which value reaches which
by any route), ``graph`` (the graph and the evaluation of ``x``, ``D``, ``D_f``),
``exactness`` (how exact each parameter's gradient is), ``report`` (how each
parameter is trained) and ``build`` (``compile_graph``, which puts them together).
"""

from .build import compile_graph
from .errors import CompileError, TruncationWarning
from .graph import ETPGraph, HiddenGroup, OpInfo, Relation, StepParts
from .report import CompileReport, GroupEntry, OpEntry, ParamEntry

__all__ = [
    "CompileError",
    "TruncationWarning",
    "compile_graph",
    "ETPGraph",
    "OpInfo",
    "HiddenGroup",
    "Relation",
    "StepParts",
    "CompileReport",
    "ParamEntry",
    "GroupEntry",
    "OpEntry",
]
