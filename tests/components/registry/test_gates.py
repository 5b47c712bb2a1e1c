from __future__ import annotations

import pytest

from components.config import GateRule, Operator
from components.registry.gates import evaluate_gates, lookup

REPORT = {
    "overall": {"auc": 0.91, "ece": 0.05},
    "fairness": {"sex": {"auc_gap": 0.12, "es_auc": None}},
}


def _rule(metric, op, value):
    return GateRule(metric=metric, op=Operator(op), value=value)


@pytest.mark.parametrize(
    ("rule", "passed", "reason"),
    [
        (_rule("overall.auc", ">=", 0.8), True, "overall.auc >= 0.8 holds (overall.auc = 0.9100)"),
        (_rule("overall.auc", ">", 0.91), False, "overall.auc > 0.91 fails (overall.auc = 0.9100)"),
        (_rule("overall.ece", "<=", 0.08), True, "overall.ece <= 0.08 holds (overall.ece = 0.0500)"),
        (_rule("fairness.sex.auc_gap", "<", 0.1), False, "fairness.sex.auc_gap < 0.1 fails (fairness.sex.auc_gap = 0.1200)"),
        (_rule("fairness.sex.es_auc", ">=", 0.7), False, "fairness.sex.es_auc is null"),
        (_rule("overall.aucc", ">=", 0.8), False, "overall.aucc is not in the report; did you mean 'overall.auc'?"),
        (_rule("fairness.race.auc_gap", "<=", 0.1), False, "fairness.race.auc_gap is not in the report; did you mean 'fairness.sex.auc_gap'?"),
        (_rule("overall", ">=", 0.1), False, "overall is not a number (dict)"),
    ],
)
def test_each_rule_gets_a_verdict_and_a_reason(rule, passed, reason):
    (result,) = evaluate_gates(REPORT, [rule])
    assert (result.passed, result.reason) == (passed, reason)


def test_lookup_walks_dotted_paths():
    assert lookup(REPORT, "fairness.sex.auc_gap") == (True, 0.12)
    assert lookup(REPORT, "fairness.sex.auc_gap.x") == (False, None)
