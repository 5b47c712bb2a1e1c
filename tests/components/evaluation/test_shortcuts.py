"""The shortcut audit against scikit-learn: the probe's AUC, its bootstrap interval, and the reasons
it gives when an attribute cannot be judged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components.evaluation.bootstrap import resample_patients
from components.evaluation.shortcuts import audit_attribute, probe, probe_cases, rows, shortcut_audit


def split(rng, n, groups, signal):
    """Features (n, 6) whose first column shifts with the group by ``signal``; rows with patient ids."""
    labels = rng.choice(groups, size=n)
    codes = np.searchsorted(np.array(sorted(groups)), labels)
    features = rng.normal(size=(n, 6))
    features[:, 0] += signal * codes
    frame = pd.DataFrame({"attr": labels, "patient_id": [f"p{i // 2}" for i in range(n)]})
    return features, frame


def reference_auc(train_f, train_y, test_f, test_y):
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train_f, train_y)
    prob = model.predict_proba(test_f)
    if len(model.classes_) == 2:
        return roc_auc_score(test_y == model.classes_[1], prob[:, 1])
    return roc_auc_score(test_y, prob, multi_class="ovr", labels=model.classes_)


@pytest.mark.parametrize("groups", [["F", "M"], ["<40", "40-59", "60+"]])
def test_the_shortcut_auc_equals_scikit_learns_probe(groups):
    rng = np.random.default_rng(1)
    train_f, train = split(rng, 200, groups, 1.5)
    test_f, test = split(rng, 90, groups, 1.5)
    audit = audit_attribute(train_f, train["attr"], test_f, test["attr"], test["patient_id"].to_numpy(),
                            n_bootstrap=0, seed=0, min_group_size=5)
    expected = reference_auc(train_f, train["attr"].to_numpy(), test_f, test["attr"].to_numpy())
    assert audit["auc"] == pytest.approx(expected, abs=1e-12)
    assert audit["auc"] > 0.75 and audit["n_train"] == 200 and audit["n_test"] == 90
    assert audit["groups"] == sorted(groups) and audit["ci95"] is None


def test_the_interval_is_scipys_bca_over_scikit_learns_aucs_of_the_same_resamples():
    """One case per patient: the resampled AUCs are scikit-learn's with the resample's case weights, and the
    interval is scipy.stats.bootstrap's BCa interval of that distribution (its jackknife over the cases)."""
    from types import SimpleNamespace

    from scipy import stats

    rng = np.random.default_rng(2)
    train_f, train = split(rng, 160, ["F", "M"], 1.0)
    test_f, test = split(rng, 80, ["F", "M"], 1.0)
    test["patient_id"] = [f"p{i}" for i in range(80)]
    audit = audit_attribute(train_f, train["attr"], test_f, test["attr"], test["patient_id"].to_numpy(),
                            n_bootstrap=200, seed=5, min_group_size=5)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(train_f, train["attr"])
    score, positive = model.predict_proba(test_f)[:, 1], (test["attr"] == "M").to_numpy()
    codes = np.unique(test["patient_id"], return_inverse=True)[1]
    weights = np.concatenate(list(resample_patients(int(codes.max()) + 1, n_resamples=200,
                                                    rng=np.random.default_rng(5))))[:, codes]
    values = np.array([roc_auc_score(positive, score, sample_weight=w) for w in weights])
    reference = stats.bootstrap((positive, score), lambda a, b: roc_auc_score(a, b), paired=True, vectorized=False,
                                method="BCa", n_resamples=0,
                                bootstrap_result=SimpleNamespace(bootstrap_distribution=values))
    low, high = reference.confidence_interval
    assert audit["ci95"] == pytest.approx([min(low, audit["auc"]), max(high, audit["auc"])], abs=1e-12)
    assert audit["ci95"][0] <= audit["auc"] <= audit["ci95"][1]


def test_features_without_the_attribute_score_near_chance():
    rng = np.random.default_rng(3)
    train_f, train = split(rng, 300, ["A", "B"], 0.0)
    test_f, test = split(rng, 300, ["A", "B"], 0.0)
    audit = audit_attribute(train_f, train["attr"], test_f, test["attr"], test["patient_id"].to_numpy(),
                            n_bootstrap=300, seed=0, min_group_size=5)
    assert abs(audit["auc"] - 0.5) < 0.1 and audit["ci95"][0] < 0.5 < audit["ci95"][1]


def test_attributes_that_cannot_be_judged_are_null_with_the_reason():
    rng = np.random.default_rng(4)
    train_f, train = split(rng, 40, ["F", "M"], 1.0)
    test_f, test = split(rng, 20, ["F", "M"], 1.0)
    train["one"], test["one"] = "site-a", "site-a"
    train["rare"] = ["x"] * 38 + ["y"] * 2
    test["rare"] = ["x"] * 18 + ["y"] * 2
    test["test_only_one"] = "F"
    train["test_only_one"] = train["attr"]
    audits = shortcut_audit(train_f, train, test_f, test, attributes=["one", "rare", "test_only_one", "absent"],
                            n_bootstrap=10, seed=0, min_group_size=5)
    assert set(audits) == {"one", "rare", "test_only_one"}  # an attribute the manifest lacks is not audited
    assert audits["one"]["auc"] is None and "fewer than two groups" in audits["one"]["reason"]
    assert audits["rare"]["auc"] is None and "y: 2" in audits["rare"]["reason"]
    assert audits["test_only_one"]["auc"] is None and "one group only (F)" in audits["test_only_one"]["reason"]


def test_the_probe_is_fitted_on_at_most_the_limit_of_training_cases_drawn_with_the_seed():
    train = pd.DataFrame({"case_id": [f"c{i}" for i in range(50)], "patient_id": [f"p{i // 2}" for i in range(50)]},
                         index=np.arange(100, 150))
    assert probe_cases(train, limit=None, seed=0) is train and probe_cases(train, limit=50, seed=0) is train
    drawn = probe_cases(train, limit=20, seed=3)
    assert len(drawn) == 20 and drawn.index.is_monotonic_increasing and set(drawn.index) <= set(train.index)
    assert drawn.equals(probe_cases(train, limit=20, seed=3))  # the same rows for the same seed
    assert not drawn.index.equals(probe_cases(train, limit=20, seed=4).index)
    assert not drawn.index.equals(train.index[:20])  # drawn, not the first rows


def test_an_evaluated_run_reports_its_shortcuts_from_the_networks_own_features(workspace, small_dataset):
    """End to end on a trained DenseNet: the report's shortcut AUC equals scikit-learn's probe on features
    computed by hand from MONAI's DenseNet layers (everything before its last linear layer)."""
    import json

    import torch

    from components.config import GateRule, load_config
    from components.inference.evaluate import evaluate_run
    from components.inference.model import load_run_model
    from components.registry.gates import evaluate_gates
    from components.training.classification import train_classifier
    from components.training.preprocess import training_transforms

    config_overrides = ["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=50", "evaluate.min_group_size=3",
                        "registry.experiment=test-shortcuts"]
    config = load_config(overrides=config_overrides, environ={})
    trained = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=config,
                              out_dir=workspace / "eval")
    report = json.loads(evaluation.report.read_text())
    model, spec, _ = load_run_model(trained.run_id)
    manifest = pd.read_parquet(small_dataset)
    transform = training_transforms(spec, augment=False)

    def features(frame):
        images = torch.stack([transform({"image": str(small_dataset.parent / p)})["image"] for p in frame["image"]])
        with torch.no_grad():
            layers = model.class_layers
            return torch.flatten(layers.pool(layers.relu(model.features(images))), 1).numpy()

    train, test = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "test"]
    sex = report["shortcuts"]["sex"]
    expected = reference_auc(features(train), train["sex"].astype(str).to_numpy(), features(test),
                             test["sex"].astype(str).to_numpy())
    assert sex["auc"] == pytest.approx(expected, abs=1e-6)
    assert sex["ci95"][0] <= sex["auc"] <= sex["ci95"][1]
    assert set(report["shortcuts"]) == set(config.data.attributes)
    page = (workspace / "eval" / "report.html").read_text()
    assert "<h2>Shortcuts</h2>" in page and "shortcut AUC chart" in page
    gate = evaluate_gates(report, [GateRule(metric="shortcuts.sex.auc", op="<=", value=1.0)])[0]
    assert gate.passed and gate.value == pytest.approx(sex["auc"])

    # with evaluate.shortcut_train_cases below the training split, the probe is fitted on the cases drawn
    limit = len(train) // 2
    capped = load_config(overrides=[*config_overrides, f"evaluate.shortcut_train_cases={limit}"], environ={})
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=capped,
                              out_dir=workspace / "eval-capped")
    capped_sex = json.loads(evaluation.report.read_text())["shortcuts"]["sex"]
    drawn = probe_cases(train, limit=limit, seed=capped.evaluate.seed)
    assert len(drawn) == limit and capped_sex["n_train"] == limit
    expected = reference_auc(features(drawn), drawn["sex"].astype(str).to_numpy(), features(test),
                             test["sex"].astype(str).to_numpy())
    assert capped_sex["auc"] == pytest.approx(expected, abs=1e-6)


def test_rows_take_the_kept_features_and_copy_none_when_every_row_is_kept():
    features = np.arange(12.0).reshape(4, 3)
    assert rows(features, np.ones(4, dtype=bool)) is features  # the probe's features are not copied
    np.testing.assert_array_equal(rows(features, np.array([True, False, True, False])), features[[0, 2]])


def test_the_probe_fitted_in_passes_is_scikit_learns_fitted_at_once():
    rng = np.random.default_rng(3)
    features = (rng.normal(size=(1000, 5)) * [0.1, 1, 10, 100, 1000] + 7).astype(np.float32)
    groups = np.where(features[:, 2] + rng.normal(scale=10, size=1000) > 7, "f", "m")
    at_once = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features, groups)
    in_passes = probe(features, groups, rows_per_pass=128)  # 8 passes, the last of 104 rows
    np.testing.assert_allclose(in_passes[0].mean_, at_once[0].mean_, rtol=1e-12)
    np.testing.assert_allclose(in_passes[0].var_, at_once[0].var_, rtol=1e-12)
    np.testing.assert_allclose(in_passes.predict_proba(features), at_once.predict_proba(features), atol=1e-9)
