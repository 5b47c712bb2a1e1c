"""External validation end to end through the steps' functions: a site never trained or tuned on, reported
apart, with the difference from the internal test set that a promotion rule can gate on."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

from components import paths
from components.config import GateRule, load_config
from components.data.study import study_manifest
from components.data.step import DatasetVersion
from components.inference.evaluate import evaluate_model
from components.registry.gates import evaluate_gates
from components.training.step import train_dataset

TINY = ["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=50", "registry.experiment=test-external",
        "evaluate.min_group_size=2", "data.name=small", "study.external_sites=[site-c]"]


def test_a_site_held_out_is_never_trained_on_and_is_reported_apart(small_dataset, workspace):
    config = load_config(overrides=TINY, environ={})
    manifest = pd.read_parquet(small_dataset)
    internal = manifest[manifest["site"] != "site-c"]
    dataset = DatasetVersion(name="small", manifest=small_dataset, version="v1", n_cases=len(manifest),
                             n_patients=manifest["patient_id"].nunique())
    (workspace / "validation.json").write_text("{}")
    trained = train_dataset(dataset, workspace / "validation.json", config)  # the steps' own functions
    run = MlflowClient(paths.tracking_uri()).get_run(trained.run_id)
    assert int(run.data.params["n_train"]) == (internal["split"] == "train").sum()
    assert int(run.data.params["n_val"]) == (internal["split"] == "val").sum()

    evaluation = evaluate_model(trained.run_id, dataset, config)
    report = json.loads(evaluation.report.read_text())
    assert pd.read_parquet(study_manifest(small_dataset, config.study)).query("site == 'site-c'")["split"].eq(
        "external").all()
    assert report["n"] == (internal["split"] == "test").sum()
    external = report["external"]
    assert external["sites"] == ["site-c"] and external["n"] == (manifest["site"] == "site-c").sum()
    table = pd.read_parquet(evaluation.report.parent / "external_predictions.parquet")
    truth = manifest.set_index("case_id").loc[table["case_id"], "label"].to_numpy()
    assert external["overall"]["auc"] == pytest.approx(roc_auc_score(truth, table["prob"]))
    delta = report["external_delta"]
    assert delta["auc"] == pytest.approx(external["overall"]["auc"] - report["overall"]["auc"])
    low, high = delta["ci95"]["auc"]
    assert low <= delta["auc"] <= high and high > low
    assert set(external["groups"]["site"]) == {"site-c"}
    metrics = MlflowClient(paths.tracking_uri()).get_run(trained.run_id).data.metrics
    assert metrics["external_auc"] == pytest.approx(external["overall"]["auc"])
    assert metrics["external_delta_auc"] == pytest.approx(delta["auc"])
    # a promotion rule reads it like any path of the report
    (result,) = evaluate_gates(report, [GateRule(metric="external_delta.auc", op=">=", value=delta["auc"] + 0.01)])
    assert not result.passed and result.value == pytest.approx(delta["auc"])


def test_the_difference_interval_is_the_spread_of_independent_resamples():
    from components.evaluation.intervals import difference_intervals  # noqa: PLC0415

    rng = np.random.default_rng(3)
    y1, y2 = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    good = np.clip(0.35 * y1 + rng.uniform(0, 0.65, 300), 0, 1)
    worse = np.clip(0.1 * y2 + rng.uniform(0, 0.9, 300), 0, 1)
    ids = np.arange(300).astype(str)
    intervals = difference_intervals((y1, good, ids), (y2, worse, ids), threshold=0.5, n_resamples=400)
    auc_delta = roc_auc_score(y2, worse) - roc_auc_score(y1, good)
    low, high = intervals["auc"]
    assert low <= auc_delta <= high < 0  # clearly worse: the whole interval below 0
    same = difference_intervals((y1, good, ids), (y1, good, ids), threshold=0.5, n_resamples=400)
    assert same["auc"][0] < 0 < same["auc"][1]


def test_the_html_report_has_an_external_section(small_dataset, workspace):
    from components.evaluation.html_report import render_html  # noqa: PLC0415
    from tests.components.evaluation.references import prediction_tables  # noqa: PLC0415

    predictions, manifest = prediction_tables(200)
    report = {"task": "binary", "n": 200, "n_patients": 100, "threshold": 0.5, "overall": {"auc": 0.8},
              "ci95": {}, "groups": {}, "fairness": {}, "external": {"n": 40, "n_patients": 20, "sites": ["site-c"],
                                                                      "overall": {"auc": 0.7}},
              "external_delta": {"auc": -0.1, "ci95": {"auc": [-0.2, -0.01]}}}
    page = render_html(report, predictions, manifest)
    assert "<h2>External sites</h2>" in page and "from site-c, never trained" in page
    assert "<td>auc</td><td>0.800</td><td>0.700</td><td>-0.100</td><td>-0.200 – -0.010</td>" in page
