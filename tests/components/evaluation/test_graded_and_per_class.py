"""Sensitivity at a specificity, quadratic weighted kappa for ordered grades and per-class AUROC, each against
an independent implementation (torchmetrics, scikit-learn), in its point and weighted (bootstrap) forms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from torchmetrics.functional.classification import (
    binary_sensitivity_at_specificity, multiclass_sensitivity_at_specificity,
)

from components.errors import EvaluationError
from components.evaluation.bootstrap import weighted_metrics
from components.evaluation.declarations import MetricSettings
from components.evaluation.metrics import classification_metrics
from components.evaluation.report import evaluate_predictions

from .references import prediction_tables, synthetic_predictions


@pytest.mark.parametrize("specificity", [0.5, 0.8, 0.9, 0.95])
def test_sensitivity_at_specificity_is_torchmetrics(specificity):
    settings = MetricSettings(specificity=specificity)
    y, prob, _ = synthetic_predictions(400, seed=1)
    ours = classification_metrics(y, prob, settings=settings)["sensitivity_at_specificity"]
    expected, _ = binary_sensitivity_at_specificity(torch.tensor(prob), torch.tensor(y), min_specificity=specificity)
    assert ours == pytest.approx(float(expected), abs=1e-6)
    y3, prob3, _ = synthetic_predictions(400, seed=2, k=3)
    ours3 = classification_metrics(y3, prob3, settings=settings)["sensitivity_at_specificity"]
    per_class, _ = multiclass_sensitivity_at_specificity(torch.tensor(prob3), torch.tensor(y3), num_classes=3,
                                                         min_specificity=specificity)
    assert ours3 == pytest.approx(float(per_class.mean()), abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_weighted_forms_equal_the_point_functions_on_repeated_cases(k):
    """Integer weights are repeated cases: the bootstrap's form of each metric is the point function there."""
    settings = MetricSettings(specificity=0.85, ordinal=True)
    y, prob, _ = synthetic_predictions(300, seed=4, k=k)
    weights = np.random.default_rng(5).integers(0, 3, size=len(y)).astype(float)
    repeated = np.repeat(np.arange(len(y)), weights.astype(int))
    point = classification_metrics(y[repeated], prob[repeated], threshold=0.4, settings=settings)
    weighted = weighted_metrics(y, prob, weights[None], threshold=0.4, settings=settings)
    for name in ("sensitivity_at_specificity", "qwk"):
        assert weighted[name][0] == pytest.approx(point[name], abs=1e-9), name
    predicted = (prob >= 0.4).astype(int) if k == 2 else prob.argmax(axis=1)
    assert weighted["qwk"][0] == pytest.approx(cohen_kappa_score(y, predicted, weights="quadratic",
                                                                 sample_weight=weights), abs=1e-9)


def test_an_ordinal_report_holds_kappa_with_its_interval_and_a_graded_one_does_not_by_default():
    predictions, manifest = prediction_tables(400, k=5, seed=6)
    graded = evaluate_predictions(predictions, manifest, attributes=["sex"], n_bootstrap=200, ordinal=True)
    prob = predictions[[f"prob_{c}" for c in range(5)]].to_numpy()
    expected = cohen_kappa_score(predictions["y_true"], prob.argmax(axis=1), weights="quadratic")
    assert graded.ordinal and graded.overall["qwk"] == pytest.approx(expected)
    low, high = graded.ci95["qwk"]
    assert low <= graded.overall["qwk"] <= high and high - low > 0.01
    assert graded.groups["sex"]["F"]["qwk"] < graded.groups["sex"]["M"]["qwk"]  # the model is worse for F
    plain = evaluate_predictions(predictions, manifest, attributes=[], n_bootstrap=0)
    assert "qwk" not in plain.overall and not plain.ordinal


@pytest.mark.parametrize("k", [3, 4])
def test_per_class_auc_is_scikit_learns_one_vs_rest_with_intervals(k):
    predictions, manifest = prediction_tables(300, k=k, seed=7)
    report = evaluate_predictions(predictions, manifest, attributes=[], n_bootstrap=200)
    prob = predictions[[f"prob_{c}" for c in range(k)]].to_numpy()
    y = predictions["y_true"].to_numpy()
    assert list(report.per_class) == [str(c) for c in range(k)]
    for c in range(k):
        entry = report.per_class[str(c)]
        assert entry["auc"] == pytest.approx(roc_auc_score(y == c, prob[:, c]))
        assert entry["n_positive"] == int((y == c).sum())
        low, high = entry["ci95"]["auc"]
        assert low <= entry["auc"] <= high
    # the macro AUC is the mean of the per-class ones (scikit-learn's ovr macro)
    assert report.overall["auc"] == pytest.approx(np.mean([report.per_class[str(c)]["auc"] for c in range(k)]))


def test_per_class_auc_of_a_multi_label_report_and_none_for_a_binary_one():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, size=(200, 3))
    y[:, 2] = 0  # a label no case has: no AUC, and why
    prob = np.clip(0.5 * y + rng.uniform(0, 0.6, size=y.shape), 0, 1)
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(200)],
                          **{f"y_true_{j}": y[:, j] for j in range(3)}, **{f"prob_{j}": prob[:, j] for j in range(3)}})
    report = evaluate_predictions(table, table[["case_id"]], attributes=[], n_bootstrap=50)
    assert report.per_class["0"]["auc"] == pytest.approx(roc_auc_score(y[:, 0], prob[:, 0]))
    assert report.per_class["2"]["auc"] is None and "one class" in report.per_class["2"]["note"]
    assert report.per_class["2"]["ci95"]["auc"] is None
    binary, manifest = prediction_tables(100)
    assert evaluate_predictions(binary, manifest, attributes=[], n_bootstrap=0).per_class is None


def test_bad_settings_are_one_line():
    predictions, manifest = prediction_tables(100)
    with pytest.raises(EvaluationError, match="target specificity must be between 0 and 1, not 1.5"):
        evaluate_predictions(predictions, manifest, attributes=[], n_bootstrap=0, target_specificity=1.5)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "y_true_0": [0, 1, 0, 1], "y_true_1": [1, 1, 0, 0],
                          "prob_0": rng.uniform(size=4), "prob_1": rng.uniform(size=4)})
    with pytest.raises(EvaluationError, match="ordinal grades need one class per case"):
        evaluate_predictions(table, table[["case_id"]], attributes=[], n_bootstrap=0, ordinal=True)


def test_the_html_report_shows_each_class_and_the_graded_metric():
    from components.evaluation.html_report import render_html  # noqa: PLC0415

    predictions, manifest = prediction_tables(300, k=3, seed=9)
    report = evaluate_predictions(predictions, manifest, attributes=["sex"], n_bootstrap=50, ordinal=True,
                                  target_specificity=0.8).to_dict()
    page = render_html(report, predictions, manifest)
    assert "<h2>Per class</h2>" in page and "at least 0.8" in page and "quadratic weighted" in page
    for k, entry in report["per_class"].items():
        assert f"<td>{k}</td><td>{entry['n_positive']}</td><td>{entry['auc']:.3f}" in page
    assert "<td>qwk</td>" in page and "<td>sensitivity_at_specificity</td>" in page


def test_ordinal_is_refused_for_tasks_without_grades():
    from components.config import load_config  # noqa: PLC0415
    from components.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError, match="data.ordinal grades one class per image; a segmentation task has none"):
        load_config(overrides=["data.task=segmentation", "data.ordinal=true"], environ={})
    assert load_config(overrides=["data.ordinal=true"], environ={}).data.ordinal


def test_a_single_labels_interval_is_the_overall_auc_interval():
    """One label: its per-class AUC interval comes from the same resamples and BCa as the report's own AUC
    interval (itself checked against scipy and scikit-learn in test_bootstrap), so the two are equal."""
    rng = np.random.default_rng(10)
    y = rng.integers(0, 2, 300)
    prob = np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1)
    table = pd.DataFrame({"case_id": [f"c{i}" for i in range(300)], "y_true_0": y, "prob_0": prob})
    manifest = pd.DataFrame({"case_id": table["case_id"], "patient_id": [f"p{i // 3}" for i in range(300)]})
    report = evaluate_predictions(table, manifest, attributes=[], n_bootstrap=300, seed=4)
    assert report.per_class["0"]["auc"] == pytest.approx(report.overall["auc"])
    assert report.per_class["0"]["ci95"]["auc"] == pytest.approx(report.ci95["auc"], abs=1e-12)
