from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

from components.evaluation.metrics import METRICS, classification_metrics

from .references import ece_reference, synthetic_predictions


def test_binary_metrics_match_independent_implementations():
    y, prob, _ = synthetic_predictions(2000)
    m = classification_metrics(y, prob, threshold=0.5)
    pred = (prob >= 0.5).astype(int)
    ece, mce = ece_reference(prob, y.astype(float))
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["ece"] == pytest.approx(ece, abs=1e-6)
    assert m["mce"] == pytest.approx(mce, abs=1e-6)
    assert m["brier"] == pytest.approx(np.mean((prob - y) ** 2))
    p_true = np.clip(np.where(y == 1, prob, 1 - prob), 1e-15, 1)
    assert m["nll"] == pytest.approx(-np.mean(np.log(p_true)), rel=1e-6)


def test_threshold_moves_the_decision_metrics_only():
    y, prob, _ = synthetic_predictions(500)
    low, high = classification_metrics(y, prob, threshold=0.2), classification_metrics(y, prob, threshold=0.8)
    assert low["sensitivity"] > high["sensitivity"] and low["specificity"] < high["specificity"]
    assert low["auc"] == high["auc"] and low["ece"] == high["ece"]


def test_multiclass_metrics_match_independent_implementations():
    y, prob, _ = synthetic_predictions(1500, k=4)
    m = classification_metrics(y, prob)
    pred = prob.argmax(axis=1)
    ece, mce = ece_reference(prob.max(axis=1), (pred == y).astype(float))
    specificity = np.mean([np.mean(pred[y != c] != c) for c in range(4)])
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["specificity"] == pytest.approx(specificity)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["ece"] == pytest.approx(ece, abs=1e-5)
    assert m["brier"] == pytest.approx(np.mean(np.sum((prob - np.eye(4)[y]) ** 2, axis=1)))


def test_one_class_has_null_auc_and_a_reason_instead_of_a_crash():
    m = classification_metrics(np.zeros(20, dtype=int), np.linspace(0, 1, 20))
    assert m["auc"] is None
    assert m["notes"] == {"auc": "only one class (0) present"}
    assert set(METRICS) <= set(m)


def test_perfect_predictor():
    y = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(y, y.astype(float))
    assert (m["auc"], m["accuracy"], m["ece"], m["brier"]) == (1.0, 1.0, 0.0, 0.0)


def test_ece_is_binned_as_torchmetrics_bins_it():
    import torch

    y, prob, _ = synthetic_predictions(300, seed=4)
    expected = binary_calibration_error(torch.tensor(prob), torch.tensor(y), n_bins=15).item()
    assert classification_metrics(y, prob)["ece"] == pytest.approx(expected)


def test_a_confidence_of_exactly_one_has_its_own_bin_as_in_torchmetrics():
    from components.evaluation.bootstrap import weighted_metrics

    y, prob = np.array([0, 0]), np.array([0.95, 1.0])
    m = classification_metrics(y, prob)
    assert (m["ece"], m["mce"]) == (pytest.approx(0.975), pytest.approx(1.0))
    w = weighted_metrics(y, prob, np.ones((1, 2)), threshold=0.5)
    assert (w["ece"][0], w["mce"][0]) == (pytest.approx(0.975), pytest.approx(1.0))
