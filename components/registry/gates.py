"""The promotion policy: absolute rules over report.json paths.

A rule names a dotted path (``overall.auc``, ``fairness.sex.auc_gap``), an
operator and a threshold. No library evaluates such a policy, so it is here.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from components.config import GateRule, Operator

_COMPARE = {Operator.GE: operator.ge, Operator.GT: operator.gt, Operator.LE: operator.le, Operator.LT: operator.lt}


@dataclass(frozen=True)
class GateResult:
    """One rule's verdict."""

    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _paths(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            out += _paths(value, f"{prefix}{key}.")
    return out


def lookup(report: Mapping, path: str) -> tuple[bool, object]:
    """``(found, value)`` of a dotted path in the report."""
    node: object = report
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def evaluate_gates(report: Mapping, rules: Sequence[GateRule]) -> list[GateResult]:
    """Evaluate every rule against a report; a missing or null metric fails its rule with the reason."""
    results = []
    for rule in rules:
        found, value = lookup(report, rule.metric)
        shown = f"{rule.metric} {rule.op.value} {rule.value:g}"
        if not found:
            hint = difflib.get_close_matches(rule.metric, _paths(report), n=1)
            reason = f"{rule.metric} is not in the report" + (f"; did you mean {hint[0]!r}?" if hint else "")
            results.append(GateResult(rule.metric, rule.op.value, rule.value, None, False, reason))
        elif value is None or isinstance(value, (Mapping, list, str, bool)):
            why = "is null" if value is None else f"is not a number ({type(value).__name__})"
            results.append(GateResult(rule.metric, rule.op.value, rule.value, None, False, f"{rule.metric} {why}"))
        else:
            passed = bool(_COMPARE[rule.op](float(value), rule.value))
            verdict = "holds" if passed else "fails"
            results.append(
                GateResult(rule.metric, rule.op.value, rule.value, float(value), passed,
                           f"{shown} {verdict} ({rule.metric} = {float(value):.4f})")
            )
    return results
