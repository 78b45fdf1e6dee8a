"""What the compiler learnt about a step, in one typed value.

:func:`braintrace.compiler.compile_graph` fills an :class:`Analysis`; the report
(:mod:`braintrace.compiler.report`) and the exactness classes
(:mod:`braintrace.compiler.exactness`) read it. Keeping it in one frozen value is
what lets each of those be a pure function of one argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .reach import Routes

__all__ = ["Analysis"]


@dataclasses.dataclass(frozen=True)
class Analysis:
    """The compiled graph plus the path analysis behind it.

    Attributes
    ----------
    graph : ETPGraph
        Ops, hidden groups, relations and the flattened program.
    param_paths, hidden_paths : tuple of str
        ``keystr`` of every flat ``params`` / ``hidden`` leaf (``''`` for a bare array).
    param_avals : tuple
        Shape and dtype of every flat ``params`` leaf.
    op_notes : dict
        Op index -> list of notes on its output's paths (cut, not position-preserving).
    dropped_coupling : dict
        Float hidden leaf -> couplings into it that ``D`` leaves out.
    out_taint : tuple
        Per hidden leaf, ``{source: Reach}`` over the paths ``D`` and ``D_f`` follow.
    routes : Routes
        Every route from every source (see :mod:`braintrace.compiler.reach`).
    control_flow : tuple
        ``(label, handling, note)`` per cond, switch and loop of the step.
    """

    graph: Any
    param_paths: tuple
    param_avals: tuple
    hidden_paths: tuple
    op_notes: dict
    dropped_coupling: dict
    out_taint: tuple
    routes: Routes
    control_flow: tuple = ()  # (label, handling, note) per cond, switch and loop

    @property
    def num_hidden(self) -> int:
        return len(self.hidden_paths)

    def hidden_reach(self) -> list:
        """Per hidden leaf: ``{source: route tags}`` of the value the step returns for it."""
        outputs = self.graph.program.outputs[: self.num_hidden]
        return [self.routes.of(atom) for atom in outputs]

    def out_sources(self) -> set:
        """Every source that reaches some leaf of ``out``."""
        outputs = self.graph.program.outputs[self.num_hidden :]
        return set().union(*(self.routes.of(atom) for atom in outputs)) if outputs else set()

    def param_label(self, leaf: int) -> str:
        return f"params{self.param_paths[leaf]}"

    def hidden_label(self, leaf: int) -> str:
        return f"hidden{self.hidden_paths[leaf]}"
