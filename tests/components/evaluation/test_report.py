from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from components.errors import EvaluationError
from components.evaluation.metrics import METRICS
from components.evaluation.report import (
    BAD_LABELS,
    DUPLICATE_IDS,
    NAN_VALUES,
    NO_PROB_COLUMNS,
    NOT_NORMALISED,
    OUT_OF_RANGE,
    UNKNOWN_ATTRIBUTE,
    UNKNOWN_IDS,
    evaluate_predictions,
)

from .references import prediction_tables


def _tables(n=600, k=2, seed=0):
    return prediction_tables(n, k=k, seed=seed)


def test_binary_report_follows_the_contract():
    predictions, manifest = _tables()
    report = evaluate_predictions(predictions, manifest, n_bootstrap=200).to_dict()
    assert report["task"] == "binary" and report["n"] == 600 and report["n_patients"] == 300
    assert set(METRICS) <= set(report["overall"]) and set(METRICS) == set(report["ci95"])
    assert report["overall"]["auc"] == pytest.approx(roc_auc_score(predictions["y_true"], predictions["prob"]))
    assert set(report["groups"]) == {"sex", "race", "site"}
    assert set(report["groups"]["site"]) == {"a", "b", "c"}
    for attribute in ("sex", "race", "site"):
        assert {"auc_gap", "es_auc", "equalized_odds_difference", "demographic_parity_difference"} <= set(report["fairness"][attribute])
    json.dumps(report)  # serialisable as is


def test_multiclass_report_and_two_column_tables_are_binary():
    predictions, manifest = _tables(k=3)
    report = evaluate_predictions(predictions, manifest, n_bootstrap=50)
    assert report.task == "multiclass"
    assert report.fairness["sex"]["equalized_odds_difference"] is None
    two = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "y_true": [0, 1, 0, 1],
                        "prob_0": [0.9, 0.2, 0.6, 0.3], "prob_1": [0.1, 0.8, 0.4, 0.7]})
    binary = evaluate_predictions(two, pd.DataFrame({"case_id": list("abcd")}), n_bootstrap=0)
    assert binary.task == "binary" and binary.overall["auc"] == 1.0


def test_report_is_invariant_to_row_order():
    predictions, manifest = _tables()
    a = evaluate_predictions(predictions, manifest, n_bootstrap=0).to_dict()
    b = evaluate_predictions(predictions.sample(frac=1, random_state=2), manifest.sample(frac=1, random_state=3), n_bootstrap=0).to_dict()
    assert a["overall"] == pytest.approx(b["overall"])
    assert a["fairness"]["sex"]["auc_gap"] == pytest.approx(b["fairness"]["sex"]["auc_gap"])


def test_small_groups_warn():
    predictions, manifest = _tables(n=100)
    report = evaluate_predictions(predictions, manifest, attributes=["race"], n_bootstrap=0, min_group_size=40)
    assert report.warnings and all("below min_group_size 40" in w for w in report.warnings)


def _corrupt(case: str):
    predictions, manifest = _tables(n=20)
    if case == "duplicate":
        predictions.loc[1, "case_id"] = "C00000"
        return predictions, manifest, DUPLICATE_IDS.format(path="predictions", ids="C00000")
    if case == "unknown":
        predictions.loc[2, "case_id"] = "X1"
        return predictions, manifest, UNKNOWN_IDS.format(path="predictions", ids="X1")
    if case == "nan":
        predictions.loc[3, "prob"] = np.nan
        return predictions, manifest, NAN_VALUES.format(path="predictions", column="prob", ids="C00003")
    if case == "range":
        predictions.loc[4, "prob"] = 1.2
        return predictions, manifest, OUT_OF_RANGE.format(path="predictions", ids="C00004")
    if case == "labels":
        predictions.loc[5, "y_true"] = 2
        return predictions, manifest, BAD_LABELS.format(path="predictions", classes=[0, 1], ids="C00005")
    if case == "no prob":
        return predictions.drop(columns=["prob"]), manifest, NO_PROB_COLUMNS.format(path="predictions")
    if case == "sum":
        predictions, manifest = _tables(n=20, k=3)
        predictions.loc[6, "prob_0"] += 0.3
        return predictions, manifest, NOT_NORMALISED.format(path="predictions", ids="C00006")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["duplicate", "unknown", "nan", "range", "labels", "no prob", "sum"])
def test_bad_predictions_name_the_rows(case):
    predictions, manifest, message = _corrupt(case)
    with pytest.raises(EvaluationError) as info:
        evaluate_predictions(predictions, manifest, n_bootstrap=0)
    assert str(info.value) == message


def test_many_bad_rows_are_listed_briefly():
    predictions, manifest = _tables(n=20)
    predictions["prob"] = 3.0
    with pytest.raises(EvaluationError) as info:
        evaluate_predictions(predictions, manifest, n_bootstrap=0)
    assert str(info.value).endswith("C00000, C00001, C00002, C00003, C00004 (+15 more)")


def test_declared_attribute_must_exist():
    predictions, manifest = _tables(n=20)
    with pytest.raises(EvaluationError) as info:
        evaluate_predictions(predictions, manifest, attributes=["ethnicity"], n_bootstrap=0)
    assert str(info.value) == UNKNOWN_ATTRIBUTE.format(attribute="ethnicity")


def test_multilabel_truth_is_checked_against_the_manifests_label_sets():
    rng = np.random.default_rng(0)
    n = 40
    truth = rng.integers(0, 2, size=(n, 3))
    ids = [f"c{i}" for i in range(n)]
    predictions = pd.DataFrame({"case_id": ids, **{f"y_true_{j}": truth[:, j] for j in range(3)},
                                **{f"prob_{j}": rng.random(n) for j in range(3)}})
    sets = ["|".join(str(j) for j in range(3) if row[j]) for row in truth]
    manifest = pd.DataFrame({"case_id": ids, "patient_id": ids, "label": sets})
    evaluate_predictions(predictions, manifest, n_bootstrap=0)  # agreeing: fine
    predictions.loc[[3, 9], "y_true_1"] = 1 - predictions.loc[[3, 9], "y_true_1"]
    with pytest.raises(EvaluationError, match=r"y_true differs from the manifest's label for 2 of 40 cases \(c3, c9\)"):
        evaluate_predictions(predictions, manifest, n_bootstrap=0)
