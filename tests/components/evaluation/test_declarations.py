"""Metric declarations: one place names each metric, its direction, its point and weighted forms,
and every consumer (report, CIs, non-inferiority, tags, card, HTML) reads it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.errors import ConfigError
from components.evaluation.bootstrap import weighted_metrics
from components.evaluation.declarations import (
    BY_NAME, CALIBRATION, FAIRNESS, METRICS, SHORTCUT, metrics_for, weighted_metrics_names,
)
from components.evaluation.metrics import classification_metrics
from components.evaluation.report import evaluate_predictions
from components.config import NonInferiorityRule
from components.registry.noninferiority import check_noninferiority, paired_noninferiority

from .references import synthetic_predictions


def test_names_are_unique_and_every_classification_metric_has_both_forms():
    assert len(BY_NAME) == len(METRICS)
    for m in metrics_for("binary"):
        assert m.point is not None and m.weighted is not None, m.name
    assert {m.name for m in metrics_for("segmentation")} == {"dice", "hd95", "voxel_ece", "voxel_mce"}
    assert [m.name for m in metrics_for("binary", kind=(CALIBRATION,))] == ["ece", "mce", "brier", "nll"]


@pytest.mark.parametrize("k", [None, 3])
def test_the_weighted_form_at_unit_weights_is_the_point_function(k):
    y, prob, _ = synthetic_predictions(500, **({"k": k} if k else {}))
    point = classification_metrics(y, prob, threshold=0.4)
    weighted = weighted_metrics(y, prob, np.ones((1, len(y))), threshold=0.4)
    for name in weighted_metrics_names():
        assert weighted[name][0] == pytest.approx(point[name], rel=1e-6, abs=1e-9), name


def test_the_report_holds_exactly_the_declared_metrics_in_their_order():
    y, prob, _ = synthetic_predictions(300)
    predictions = pd.DataFrame({"case_id": [f"c{i}" for i in range(300)], "y_true": y, "prob": prob})
    report = evaluate_predictions(predictions, predictions[["case_id"]], attributes=[], n_bootstrap=20)
    assert list(report.overall) == [m.name for m in metrics_for("binary")]
    assert list(report.ci95) == list(weighted_metrics_names())


@pytest.mark.parametrize("name", ["ece", "brier", "nll", "mce"])
def test_non_inferiority_reads_the_direction_from_the_declaration(name):
    assert not BY_NAME[name].higher_is_better
    y, prob, _ = synthetic_predictions(400, seed=3)
    noisy = np.clip(prob + np.random.default_rng(0).normal(scale=0.3, size=400), 0, 1)
    result = paired_noninferiority(y, prob, noisy, np.arange(400), metric=name, margin=0.0, n_resamples=50)
    assert result.improvement == pytest.approx(result.champion - result.challenger) and result.improvement > 0


def test_a_non_inferiority_rule_over_an_undeclared_metric_is_refused_with_the_closest():
    check_noninferiority([NonInferiorityRule(metric="auc", margin=0.02)])
    with pytest.raises(ConfigError) as info:
        check_noninferiority([NonInferiorityRule(metric="aucc", margin=0.02)])
    assert str(info.value) == (
        "promotion.non_inferiority: 'aucc' is not a metric the paired bootstrap computes; metrics are "
        "auc, accuracy, sensitivity, specificity, f1, sensitivity_at_specificity, ece, mce, brier, nll; did you mean "
        "'auc'?")
    with pytest.raises(ConfigError, match="'dice' is not a metric the paired bootstrap computes"):
        check_noninferiority([NonInferiorityRule(metric="dice", margin=0.02)])


def test_tags_card_and_html_read_the_declarations():
    from components.registry.card import model_card_markdown
    from components.registry.promote import PromotionDecision

    y, prob, _ = synthetic_predictions(200)
    predictions = pd.DataFrame({"case_id": [f"c{i}" for i in range(200)], "y_true": y, "prob": prob})
    report = evaluate_predictions(predictions, predictions[["case_id"]], attributes=[], n_bootstrap=20).to_dict()
    calibration = {"temperature": 1.2, "before": report["overall"], "after": report["overall"]}
    card = model_card_markdown(model_name="m", version="1", lineage={}, report=report, calibration=calibration,
                               manifest=None, attributes=[], decision=PromotionDecision("m", "1", True, (), None, "1"))
    assert "| | ECE | MCE | BRIER | NLL |" in card.replace("|  |", "| |")
    for m in metrics_for("binary"):
        assert f"| {m.name} |" in card
    assert {m.name for m in METRICS if m.tagged and m.kind not in (FAIRNESS, SHORTCUT)} == {
        "auc", "qwk", "ece", "brier", "dice", "hd95", "voxel_ece"}
    assert {m.name for m in METRICS if m.tagged and m.kind == SHORTCUT} == {"shortcut_auc"}
