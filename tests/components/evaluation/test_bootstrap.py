from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score, roc_auc_score

from components.evaluation.bootstrap import bootstrap_ci, resample_weights, weighted_metrics
from components.evaluation.metrics import classification_metrics

from .references import ece_reference, synthetic_predictions


@pytest.fixture
def weights():
    rng = np.random.default_rng(1)
    return rng.integers(0, 4, size=(5, 800)).astype(float)


def test_weighted_binary_metrics_match_scikit_learn_sample_weights(weights):
    y, prob, _ = synthetic_predictions(800)
    m = weighted_metrics(y, prob, weights, threshold=0.5)
    pred = (prob >= 0.5).astype(int)
    for b, w in enumerate(weights):
        assert m["auc"][b] == pytest.approx(roc_auc_score(y, prob, sample_weight=w))
        assert m["accuracy"][b] == pytest.approx(accuracy_score(y, pred, sample_weight=w))
        assert m["sensitivity"][b] == pytest.approx(recall_score(y, pred, sample_weight=w))
        assert m["specificity"][b] == pytest.approx(recall_score(y, pred, pos_label=0, sample_weight=w))
        assert m["f1"][b] == pytest.approx(f1_score(y, pred, sample_weight=w))
        assert m["brier"][b] == pytest.approx(np.average((prob - y) ** 2, weights=w))
        assert m["nll"][b] == pytest.approx(log_loss(y, prob, sample_weight=w), rel=1e-6)
        ece, mce = ece_reference(prob, y.astype(float), w)
        assert (m["ece"][b], m["mce"][b]) == (pytest.approx(ece), pytest.approx(mce))


def test_weighted_multiclass_metrics_match_scikit_learn_sample_weights(weights):
    y, prob, _ = synthetic_predictions(800, k=3)
    m = weighted_metrics(y, prob, weights, threshold=0.5)
    pred = prob.argmax(axis=1)
    for b, w in enumerate(weights):
        aucs = [roc_auc_score(y == c, prob[:, c], sample_weight=w) for c in range(3)]
        assert m["auc"][b] == pytest.approx(np.mean(aucs))
        assert m["sensitivity"][b] == pytest.approx(recall_score(y, pred, average="macro", sample_weight=w))
        assert m["f1"][b] == pytest.approx(f1_score(y, pred, average="macro", sample_weight=w))
        assert m["nll"][b] == pytest.approx(log_loss(y, prob, sample_weight=w), rel=1e-6)


def test_unit_weights_give_the_point_estimates():
    y, prob, _ = synthetic_predictions(400)
    point = classification_metrics(y, prob)
    weighted = weighted_metrics(y, prob, np.ones((1, 400)), threshold=0.5)
    for name, values in weighted.items():
        assert values[0] == pytest.approx(point[name], abs=1e-9), name


def test_resamples_draw_patients_not_images():
    codes = np.array([0, 0, 0, 1, 2, 2])
    for w in next(resample_weights(codes, n_resamples=50, rng=np.random.default_rng(0))):
        assert w[0] == w[1] == w[2] and w[4] == w[5]
        assert w[[0, 3, 4]].sum() == 3  # three patients drawn per resample


def test_intervals_cover_the_estimate_and_are_seeded():
    y, prob, groups = synthetic_predictions(600)
    patients = np.arange(600) // 2
    ci = bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, seed=3)
    point = classification_metrics(y, prob)
    for name, (low, high) in ci.items():
        assert low <= point[name] <= high, name
    assert ci == bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, seed=3)
    assert ci != bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, seed=4)


def test_patient_clusters_widen_the_interval():
    """Cases of one patient are not independent: resampling patients must see that."""
    y, prob, _ = synthetic_predictions(200)
    y, prob = np.repeat(y, 5), np.repeat(prob, 5)  # each patient imaged five times, identically
    by_patient = bootstrap_ci(y, prob, np.repeat(np.arange(200), 5), threshold=0.5, n_resamples=400)["auc"]
    by_image = bootstrap_ci(y, prob, np.arange(1000), threshold=0.5, n_resamples=400)["auc"]
    assert (by_patient[1] - by_patient[0]) > 1.5 * (by_image[1] - by_image[0])
