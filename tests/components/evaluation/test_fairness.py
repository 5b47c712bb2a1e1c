from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from components.evaluation.fairness import equity_scaled, fairness_summary, group_metrics

from .references import synthetic_predictions


@pytest.fixture
def predictions():
    y, prob, groups = synthetic_predictions(3000, seed=5)
    return y, prob, pd.Series(groups["sex"])


def test_group_metrics_equal_the_metrics_of_each_subset(predictions):
    y, prob, sex = predictions
    by_group = group_metrics(y, prob, sex, threshold=0.5)
    for g in ("F", "M"):
        mask = (sex == g).to_numpy()
        assert by_group[g]["n"] == mask.sum()
        assert by_group[g]["auc"] == pytest.approx(roc_auc_score(y[mask], prob[mask]))
    assert by_group["F"]["auc"] < by_group["M"]["auc"]  # the built-in difference shows


def test_gaps_and_equity_scaled_auc_from_the_definitions(predictions):
    y, prob, sex = predictions
    by_group = group_metrics(y, prob, sex, threshold=0.5)
    overall = roc_auc_score(y, prob)
    summary = fairness_summary(y, prob, sex, by_group, overall_auc=overall, threshold=0.5, min_group_size=10)
    auc_f, auc_m = by_group["F"]["auc"], by_group["M"]["auc"]
    assert summary["auc_gap"] == pytest.approx(auc_m - auc_f)
    assert summary["es_auc"] == pytest.approx(overall / (1 + abs(auc_f - overall) + abs(auc_m - overall)))
    pred = prob >= 0.5
    rates = {g: pred[(sex == g).to_numpy()].mean() for g in ("F", "M")}
    assert summary["demographic_parity_difference"] == pytest.approx(abs(rates["F"] - rates["M"]))
    tpr = {g: pred[(sex == g).to_numpy() & (y == 1)].mean() for g in ("F", "M")}
    fpr = {g: pred[(sex == g).to_numpy() & (y == 0)].mean() for g in ("F", "M")}
    expected_eod = max(abs(tpr["F"] - tpr["M"]), abs(fpr["F"] - fpr["M"]))
    assert summary["equalized_odds_difference"] == pytest.approx(expected_eod)


def test_odds_and_parity_differences_equal_fairlearns_on_every_case():
    """medflow hands fairlearn each distinct (label, decision, group) once with its count: the same figures as
    fairlearn's on the cases themselves, over the groups large enough to compare."""
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    y, prob, groups = synthetic_predictions(5000, seed=6)
    race = pd.Series(groups["race"])
    race[:30] = None  # an "unknown" group too small to compare
    by_group = group_metrics(y, prob, race, threshold=0.4)
    assert list(by_group) == ["unknown", "w", "x", "y", "z"]
    summary = fairness_summary(y, prob, race, by_group, overall_auc=0.8, threshold=0.4, min_group_size=40)
    assert summary["groups_compared"] == ["w", "x", "y", "z"]
    compared = race.notna().to_numpy()
    pred, features = (prob[compared] >= 0.4).astype(int), race[compared].to_numpy()
    assert summary["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y[compared], pred, sensitive_features=features), abs=1e-12)
    assert summary["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y[compared], pred, sensitive_features=features), abs=1e-12)


def test_equity_scaling_is_the_metric_itself_when_groups_agree():
    assert equity_scaled(0.9, {"a": 0.9, "b": 0.9}) == 0.9
    assert equity_scaled(0.9, {"a": 0.8, "b": 1.0}) == pytest.approx(0.9 / 1.2)
    assert equity_scaled(None, {"a": 0.8}) is None
    assert equity_scaled(0.9, {"a": None}) is None


def test_one_class_group_has_null_auc_with_a_reason_and_small_groups_are_left_out():
    y = np.array([0, 1] * 20 + [0] * 12 + [1, 0])
    prob = np.linspace(0.1, 0.9, len(y))
    groups = pd.Series(["a"] * 40 + ["b"] * 12 + ["c"] * 2)
    by_group = group_metrics(y, prob, groups, threshold=0.5)
    assert by_group["b"]["auc"] is None and by_group["b"]["notes"]["auc"] == "only one class (0) present"
    summary = fairness_summary(y, prob, groups, by_group, overall_auc=0.5, threshold=0.5, min_group_size=10)
    assert summary["groups_compared"] == ["a", "b"]
    assert summary["auc_gap"] is None
    assert summary["notes"]["auc_gap"] == "needs two groups of >= 10 cases with an AUC, found 1"


def test_missing_group_values_form_an_unknown_group():
    y = np.array([0, 1, 0, 1])
    groups = pd.Series(["a", "a", None, None])
    assert set(group_metrics(y, np.array([0.2, 0.8, 0.3, 0.6]), groups, threshold=0.5)) == {"a", "unknown"}
