"""The compile report: how every parameter will be trained, and why.

``str(report)`` is the plain-text table a user prints first when something does
not learn; the dataclasses are the structured form tests read.
"""

from __future__ import annotations

import dataclasses

TRACE = "trace"
ONE_STEP = "one-step"
NONE = "none"


@dataclasses.dataclass(frozen=True)
class ParamEntry:
    """How one ``params`` leaf is trained."""

    path: str
    shape: tuple
    dtype: str
    mode: str  # 'trace' | 'one-step' | 'none'
    groups: tuple = ()  # hidden groups whose traces train it (mode 'trace')
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class GroupEntry:
    """One hidden group."""

    index: int
    leaves: tuple
    num_states: int
    position_shape: tuple
    dropped: tuple = ()  # non-position-preserving couplings left out of D


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """One ETP op and the groups it has a trace for."""

    index: int
    primitive: str
    trainables: dict
    groups: tuple
    note: str = ""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Structured compile report; ``str()`` gives the table."""

    params: tuple
    groups: tuple
    ops: tuple
    ignored_hidden: tuple  # (path, reason)
    drtrl_bytes_per_sample: int
    pp_bytes_per_sample: int
    warnings: tuple = ()

    def param(self, path: str) -> ParamEntry:
        """The entry of the parameter whose path is ``path`` (e.g. ``"['w']"``)."""
        for entry in self.params:
            if entry.path == path:
                return entry
        known = [p.path for p in self.params]
        raise KeyError(f"no parameter {path!r} in the report; known: {known}")

    def __str__(self) -> str:
        lines = ["braintrace compile report", "=" * 25]
        for warning in self.warnings:
            lines.append(f"!! {warning}")
        lines.append("")
        lines.append("parameters")
        rows = [("path", "shape", "mode", "detail")]
        for p in self.params:
            detail = ("groups " + ", ".join(f"#{g}" for g in p.groups)) if p.groups else ""
            if p.reason:
                detail = f"{detail}; {p.reason}" if detail else p.reason
            rows.append((p.path, f"{p.dtype}{list(p.shape)}", p.mode, detail))
        lines.extend(_table(rows))
        lines.append("")
        lines.append("hidden groups")
        rows = [("group", "leaves", "S", "positions", "note")]
        for g in self.groups:
            note = ("D drops: " + "; ".join(g.dropped)) if g.dropped else ""
            rows.append((f"#{g.index}", ", ".join(g.leaves), str(g.num_states),
                         str(tuple(g.position_shape)), note))
        for path, reason in self.ignored_hidden:
            rows.append(("-", path, "-", "-", reason))
        lines.extend(_table(rows))
        lines.append("")
        lines.append("ETP ops")
        rows = [("op", "primitive", "trainables", "trace groups", "note")]
        for op in self.ops:
            trainables = ", ".join(f"{k}={v}" for k, v in op.trainables.items())
            groups = ", ".join(f"#{g}" for g in op.groups) or "-"
            rows.append((f"#{op.index}", op.primitive, trainables, groups, op.note))
        lines.extend(_table(rows))
        lines.append("")
        lines.append(
            f"trace memory per sample: D-RTRL {_bytes(self.drtrl_bytes_per_sample)}, "
            f"pp_prop {_bytes(self.pp_bytes_per_sample)}"
        )
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _table(rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out
