from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from components.errors import EvaluationError
from components.evaluation.bootstrap import resample_weights
from components.registry.noninferiority import paired_noninferiority

from tests.components.evaluation.references import synthetic_predictions


def _reference(y, a, b, patients, *, metric_fn, lower_is_better, n, seed, level):
    """The paired bootstrap, one resample at a time with scikit-learn's sample weights."""
    codes = np.unique(patients, return_inverse=True)[1]
    diffs = []
    for weights in resample_weights(codes, n_resamples=n, rng=np.random.default_rng(seed)):
        for w in weights:
            d = metric_fn(y, a, sample_weight=w) - metric_fn(y, b, sample_weight=w)
            diffs.append(-d if lower_is_better else d)
    return np.percentile(diffs, (1 - level) * 100)


@pytest.mark.parametrize(("metric", "fn", "lower"), [("auc", roc_auc_score, False), ("brier", brier_score_loss, True)])
def test_lower_bound_matches_a_resample_by_resample_reference(metric, fn, lower):
    y, good, _ = synthetic_predictions(400, seed=1)
    _, worse, _ = synthetic_predictions(400, seed=2)
    worse = np.clip(0.7 * good + 0.3 * worse, 0, 1)
    patients = np.arange(400) // 2
    result = paired_noninferiority(y, good, worse, patients, metric=metric, margin=0.02, n_resamples=200, seed=5)
    expected = _reference(y, good, worse, patients, metric_fn=fn, lower_is_better=lower, n=200, seed=5, level=0.95)
    assert result.lower_bound == pytest.approx(expected)


def test_the_same_model_is_non_inferior_and_a_much_worse_one_is_not():
    y, prob, _ = synthetic_predictions(600, seed=3)
    patients = np.arange(600)
    same = paired_noninferiority(y, prob, prob, patients, metric="auc", margin=0.02, n_resamples=200)
    assert same.improvement == 0 and same.lower_bound == 0 and same.passed
    noisy = np.clip(prob + np.random.default_rng(0).normal(scale=0.4, size=600), 0, 1)
    worse = paired_noninferiority(y, noisy, prob, patients, metric="auc", margin=0.02, n_resamples=200)
    assert worse.improvement < -0.02 and not worse.passed
    better = paired_noninferiority(y, prob, noisy, patients, metric="ece", margin=0.0, n_resamples=200)
    assert better.improvement > 0  # lower ECE than the noisy champion counts as an improvement


def test_the_champion_predicts_the_challengers_test_images_read_from_the_manifests_own_columns(tmp_path, monkeypatch):
    import pandas as pd

    from components.config import NonInferiorityRule
    from components.inference import predict
    from components.registry.noninferiority import comparison_gates

    y, prob, _ = synthetic_predictions(60, seed=3)
    cases, patients = [f"c{i}" for i in range(len(y))], np.array([f"p{i // 2}" for i in range(len(y))])
    champion = np.clip(prob + np.random.default_rng(4).normal(0, 0.1, len(y)), 0, 1)
    pd.DataFrame({"case_id": cases[::-1], "y_true": y[::-1], "prob": prob[::-1]}).to_parquet(tmp_path / "p.parquet")
    manifest = pd.DataFrame({"case_id": cases, "patient_id": patients, "split": "test", "label": y,
                             "image": [f"images/{c}.nii.gz" for c in cases], "sha256": "0" * 64})
    manifest.to_parquet(tmp_path / "m.parquet")
    asked = []

    def champion_predicts(uri, images):
        asked.append((uri, images))
        return np.stack([1 - champion, champion], axis=1)[[int(Path(p).name[1:-7]) for p in images]]

    monkeypatch.setattr(predict, "predict_images", champion_predicts)
    rule = NonInferiorityRule(metric="auc", margin=0.05)
    [gate] = comparison_gates(rules=[rule], champion="1", challenger_version="2", predictions=tmp_path / "p.parquet",
                              manifest=tmp_path / "m.parquet", model_uri="models:/m/1", n_resamples=200, seed=0,
                              threshold=0.5)
    expected = paired_noninferiority(y[::-1], prob[::-1], champion[::-1], patients[::-1], metric="auc", margin=0.05,
                                     n_resamples=200, seed=0)
    assert asked == [("models:/m/1", [tmp_path / f"images/{c}.nii.gz" for c in cases[::-1]])]
    assert gate.value == pytest.approx(expected.lower_bound, abs=1e-12) and gate.passed == expected.passed
    flipped = pd.read_parquet(tmp_path / "m.parquet").assign(label=lambda m: np.where(m["case_id"] == "c7", 1 - y, y))
    flipped.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(EvaluationError, match="c7"):  # the manifest's labels are read and checked
        comparison_gates(rules=[rule], champion="1", challenger_version="2", predictions=tmp_path / "p.parquet",
                         manifest=tmp_path / "m.parquet", model_uri="models:/m/1", n_resamples=200, seed=0,
                         threshold=0.5)
