"""Two models on the same cases: the paired difference of every metric and its interval, against
scikit-learn on the same resamples and scipy's BCa."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from components.evaluation.bootstrap import resample_patients
from components.registry.compare import compare_predictions


def _two_models(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0.01, 0.99)
    weak = np.clip(0.5 + (y - 0.5) * 0.1 + rng.normal(0, 0.3, n), 0.01, 0.99)
    sex = rng.choice(["F", "M"], n)
    return y, good, weak, sex


def test_the_paired_auc_difference_is_scipys_bca_over_scikit_learns_resampled_differences():
    y, good, weak, sex = _two_models()
    patients = np.arange(len(y))  # one case per patient: scipy's jackknife leaves out the same units as ours
    metrics, fairness = compare_predictions(y, good, weak, patients, groups={"sex": sex}, n_resamples=300, seed=4)
    auc = next(r for r in metrics if r.name == "auc")
    assert auc.a == pytest.approx(roc_auc_score(y, good)) and auc.b == pytest.approx(roc_auc_score(y, weak))
    assert auc.difference == pytest.approx(auc.a - auc.b)
    weights = np.concatenate(list(resample_patients(len(y), n_resamples=300, rng=np.random.default_rng(4))))
    diffs = np.array([roc_auc_score(y, good, sample_weight=w) - roc_auc_score(y, weak, sample_weight=w)
                      for w in weights])
    reference = stats.bootstrap((y, good, weak), lambda t, p, q: roc_auc_score(t, p) - roc_auc_score(t, q),
                                paired=True, vectorized=False, method="BCa", n_resamples=0,
                                bootstrap_result=SimpleNamespace(bootstrap_distribution=diffs))
    low, high = reference.confidence_interval
    assert auc.ci95 == pytest.approx([min(low, auc.difference), max(high, auc.difference)], abs=1e-9)
    assert auc.better == "a" and auc.ci95[0] > 0
    ece = next(r for r in metrics if r.name == "ece")
    assert ece.ci95[0] <= ece.difference <= ece.ci95[1]
    assert {r.name for r in fairness} == {"sex.auc_gap", "sex.es_auc"}


def test_a_model_compared_with_itself_differs_by_nothing():
    y, good, _, sex = _two_models(seed=1)
    metrics, fairness = compare_predictions(y, good, good.copy(), np.arange(len(y)) // 2, groups={"sex": sex},
                                            n_resamples=100)
    for row in [*metrics, *fairness]:
        if row.difference is not None:
            assert row.difference == 0 and row.ci95 == [0.0, 0.0] and row.better == ""
