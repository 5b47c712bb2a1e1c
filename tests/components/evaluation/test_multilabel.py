from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error

from components.errors import EvaluationError
from components.evaluation.bootstrap import weighted_metrics
from components.evaluation.html_report import render_html
from components.evaluation.metrics import classification_metrics
from components.evaluation.report import LABEL_COLUMNS, evaluate_predictions


def _multilabel(n=800, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < [0.2, 0.4, 0.6][:labels]).astype(int)
    prob = np.clip(0.35 * y + rng.random((n, labels)) * 0.65, 0, 1).round(3)
    return y, prob


def test_macro_metrics_match_scikit_learn_and_torchmetrics():
    y, prob = _multilabel()
    m = classification_metrics(y, prob)
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, prob >= 0.5, average="macro"))
    eces = [binary_calibration_error(torch.tensor(prob[:, j]), torch.tensor(y[:, j]), n_bins=15).item() for j in range(3)]
    assert m["ece"] == pytest.approx(np.mean(eces))


def test_a_label_with_one_class_is_left_out_of_the_auc_with_a_note():
    y, prob = _multilabel()
    y[:, 0] = 0
    m = classification_metrics(y, prob)
    assert m["auc"] == pytest.approx(roc_auc_score(y[:, 1:], prob[:, 1:], average="macro"))
    assert m["notes"] == {"auc": "label(s) [0] have one class: left out of the macro AUC"}


def test_weighted_multilabel_metrics_match_sample_weights():
    y, prob = _multilabel(300)
    w = np.random.default_rng(1).integers(0, 3, size=(3, 300)).astype(float)
    m = weighted_metrics(y, prob, w, threshold=0.5)
    for b in range(3):
        assert m["auc"][b] == pytest.approx(roc_auc_score(y, prob, average="macro", sample_weight=w[b]))


def _tables(y, prob):
    ids = [f"C{i}" for i in range(len(y))]
    predictions = pd.DataFrame({"case_id": ids, **{f"y_true_{j}": y[:, j] for j in range(y.shape[1])},
                                **{f"prob_{j}": prob[:, j] for j in range(y.shape[1])}})
    manifest = pd.DataFrame({"case_id": ids, "patient_id": [f"P{i // 2}" for i in range(len(y))],
                             "sex": np.where(np.arange(len(y)) % 2, "F", "M")})
    return predictions, manifest


def test_multilabel_report_and_page():
    y, prob = _multilabel()
    predictions, manifest = _tables(y, prob)
    report = evaluate_predictions(predictions, manifest, n_bootstrap=100)
    assert report.task == "multilabel"
    assert report.overall["auc"] == pytest.approx(roc_auc_score(y, prob, average="macro"))
    low, high = report.ci95["auc"]
    assert low < report.overall["auc"] < high
    assert report.fairness["sex"]["equalized_odds_difference"] is None
    page = render_html(report.to_dict(), predictions, manifest)
    assert page.count("base64,") == 1 + 2  # gap chart; pooled ROC and reliability for sex
    assert "Figures pool the 3 labels of every case" in page


def test_label_and_probability_columns_must_pair_up():
    y, prob = _multilabel(20)
    predictions, manifest = _tables(y, prob)
    with pytest.raises(EvaluationError) as info:
        evaluate_predictions(predictions.drop(columns=["prob_2"]), manifest, n_bootstrap=0)
    assert str(info.value) == LABEL_COLUMNS.format(path="predictions", y=["y_true_0", "y_true_1", "y_true_2"],
                                                   prob=["prob_0", "prob_1"])
    predictions.loc[4, "y_true_1"] = 2
    with pytest.raises(EvaluationError, match=r"y_true not in the class set \[0, 1\] for case_id\(s\): C4"):
        evaluate_predictions(predictions, manifest, n_bootstrap=0)
