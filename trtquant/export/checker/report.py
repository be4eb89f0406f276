"""What a check returns: :class:`Finding` s, the :class:`CheckReport` and its text table."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = ["CheckReport", "FUSION_RULE_PREFIXES", "Finding", "Severity", "Target"]

Severity = Literal["error", "warning", "info"]
Target = Literal["trt10", "trt11", "dla"]

#: Rule-id prefixes whose warnings mean lost INT8 fusion (``CheckReport.fusion_ok``).
FUSION_RULE_PREFIXES = ("B15-", "B16-", "C")


@dataclass(frozen=True)
class Finding:
    """One problem (or remark) about the model.

    Attributes:
        severity: ``error`` (parse/build fails or ORT and TensorRT disagree), ``warning`` (INT8
            fusion or speed lost) or ``info``.
        rule: stable id, checklist number + slug, e.g. ``C20-residual-add``.
        nodes: the ONNX nodes concerned (``<op_type>#<index>`` for unnamed ones); empty for
            graph-level findings.
        message: what is wrong, with the bad values, and why TensorRT cares.
        fix: one concrete change.
    """

    severity: Severity
    rule: str
    nodes: tuple[str, ...]
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "rule": self.rule, "nodes": list(self.nodes),
                "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class CheckReport:
    """Findings of :func:`check_onnx` plus summary statistics of the graph."""

    findings: tuple[Finding, ...]
    target: Target
    strongly_typed: bool | None = None
    stats: dict[str, int | None] = field(default_factory=dict)

    def _of(self, severity: Severity) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        return self._of("error")

    @property
    def warnings(self) -> list[Finding]:
        return self._of("warning")

    @property
    def infos(self) -> list[Finding]:
        return self._of("info")

    @property
    def ok(self) -> bool:
        """No errors: TensorRT should parse the model and ORT/TensorRT should agree."""
        return not self.errors

    @property
    def fusion_ok(self) -> bool:
        """No errors and no warnings from the Q/DQ pairing (B15-B16) and placement (C17-C26) rules."""
        return self.ok and not any(f.rule.startswith(FUSION_RULE_PREFIXES) for f in self.warnings)

    def rules(self, severity: Severity | None = None) -> set[str]:
        """Rule ids reported (optionally of one severity)."""
        return {f.rule for f in self.findings if severity is None or f.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "target": self.target,
            "strongly_typed": self.strongly_typed,
            "ok": self.ok,
            "fusion_ok": self.fusion_ok,
            "counts": {s: len(self._of(s)) for s in get_args(Severity)},
            "stats": dict(self.stats),
            "findings": [f.to_dict() for f in self.findings],
        }

    def summary(self) -> str:
        s = self.stats
        counts = ", ".join(f"{len(self._of(sev))} {sev}s" for sev in get_args(Severity))
        return (f"{counts} | target {self.target} | Q {s.get('quantize_linear', 0)}, "
                f"DQ {s.get('dequantize_linear', 0)} | weighted ops {s.get('weighted_ops', 0)}, "
                f"{s.get('weighted_ops_quantized', 0)} with both inputs behind DequantizeLinear")

    def format_table(self, width: int = 120) -> str:
        """Human-readable table: severity, rule, nodes, message and fix, wrapped to ``width``."""
        cols = (7, 26, 24)
        detail = max(width - sum(cols) - 2 * len(cols), 30)
        lines = [_row(("SEV", "RULE", "NODES", "DETAILS"), (*cols, detail)),
                 _row(tuple("-" * w for w in (*cols, detail)), (*cols, detail))]
        order = {s: i for i, s in enumerate(get_args(Severity))}
        for f in sorted(self.findings, key=lambda f: order[f.severity]):
            nodes = [n if len(n) <= cols[2] else n[: cols[2] - 1] + "~" for n in f.nodes[:6]] or ["(graph)"]
            if len(f.nodes) > 6:
                nodes.append(f"+{len(f.nodes) - 6} more")
            text = textwrap.wrap(f.message, detail) + textwrap.wrap("fix: " + f.fix, detail)
            rule = textwrap.wrap(f.rule, cols[1]) or [""]
            for i in range(max(len(nodes), len(text), len(rule))):
                cells = (f.severity.upper() if i == 0 else "", _at(rule, i), _at(nodes, i), _at(text, i))
                lines.append(_row(cells, (*cols, detail)))
        lines.append(self.summary())
        return "\n".join(line.rstrip() for line in lines)

    def __str__(self) -> str:
        return self.format_table()


def _at(items: list[str], i: int) -> str:
    return items[i] if i < len(items) else ""


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths))
