"""The compiler: from a step function's jaxpr to the eligibility-trace graph.

Layers, bottom up: ``program`` (trace and flatten the jaxpr), ``paths`` (which
value reaches which, position-preservingly), ``graph`` (the graph and the
evaluation of ``x``, ``D``, ``D_f``), ``report`` (how each parameter is trained)
and ``build`` (``compile_graph``, which puts them together).
"""

from .build import compile_graph
from .errors import CompileError
from .graph import ETPGraph, HiddenGroup, OpInfo, Relation, StepParts
from .report import CompileReport, GroupEntry, OpEntry, ParamEntry

__all__ = [
    "CompileError",
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
