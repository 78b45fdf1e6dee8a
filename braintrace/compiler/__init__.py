"""The compiler: from a step function's jaxpr to the eligibility-trace graph."""

from .errors import CompileError
from .graph import ETPGraph, HiddenGroup, OpInfo, Relation, StepParts, compile_graph
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
