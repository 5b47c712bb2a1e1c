"""A label-fraction study's report: each arm's figures as its report.json has them, and a plot per metric."""

from __future__ import annotations

import json

import pytest

from components.evaluation.declarations import metrics_for
from components.evaluation.study import Arm, fraction_study, site_study, write_study_html


def _report(auc: float) -> dict:
    names = [m.name for m in metrics_for("binary")]
    return {"task": "binary", "n": 97, "overall": {n: auc - 0.01 * k for k, n in enumerate(names)},
            "ci95": {n: [auc - 0.01 * k - 0.05, auc - 0.01 * k + 0.05] for k, n in enumerate(names)}}


def test_the_study_lists_each_arm_smallest_first_with_its_reports_figures(tmp_path):
    arms = [Arm(1.0, 110, "run-full", _report(0.9)), Arm(0.1, 11, "run-tenth", _report(0.7)),
            Arm(0.5, 55, "run-half", _report(0.85))]
    study = fraction_study(arms)
    assert [a["fraction"] for a in study["arms"]] == [0.1, 0.5, 1.0]
    assert study["metrics"] == [m.name for m in metrics_for("binary") if m.summary] and "auc" in study["metrics"]
    for row in study["arms"]:
        arm = next(a for a in arms if a.fraction == row["fraction"])
        assert row["run_id"] == arm.run_id and row["n_train_patients"] == arm.n_train_patients
        for name in study["metrics"]:
            assert row["metrics"][name] == {"value": arm.report["overall"][name], "ci95": arm.report["ci95"][name]}
    json.dumps(study)  # study.json is plain JSON

    page = write_study_html(study, tmp_path / "study.html").read_text()
    assert page.count("<img alt='study figure'") == len(study["metrics"])
    assert "run-tenth" in page and "0.700 [0.650, 0.750]" in page


def test_an_arm_without_a_figure_is_left_out_of_its_plot_not_drawn_at_zero(tmp_path):
    missing = _report(0.8)
    missing["overall"]["auc"], missing["ci95"]["auc"] = None, None  # one class only in the test split
    aside = _report(0.8)
    aside["ci95"]["auc"] = [0.82, 0.9]  # a BCa interval may leave its point outside: drawn, not refused
    study = fraction_study([Arm(0.1, 3, "a", missing), Arm(0.5, 15, "c", aside), Arm(1.0, 30, "b", _report(0.9))])
    assert study["arms"][0]["metrics"]["auc"] == {"value": None, "ci95": None}
    page = write_study_html(study, tmp_path / "study.html").read_text()
    assert "–" in page



def _with_external(auc: float, external_auc: float) -> dict:
    report = _report(auc)
    external = _report(external_auc)
    report["external"] = {"sites": ["x"], "n": 40, "n_patients": 20, "overall": external["overall"],
                          "ci95": external["ci95"]}
    report["external_delta"] = {n: external["overall"][n] - report["overall"][n] for n in report["overall"]}
    report["external_delta"]["ci95"] = {n: [d - 0.1, d + 0.1] for n, d in report["external_delta"].items()}
    return report


def test_leave_one_site_out_lists_each_site_external_internal_and_their_difference(tmp_path):
    every = Arm(1.0, 110, "run-all", _report(0.9))
    arms = [Arm(1.0, 70, "run-no-a", _with_external(0.88, 0.7)), Arm(1.0, 75, "run-no-b", _with_external(0.91, 0.85))]
    study = site_study(every, arms, ["site-a", "site-b"])
    assert study["design"] == "leave_one_site_out" and [a["site"] for a in study["arms"]] == ["site-a", "site-b"]
    assert study["all_sites"]["metrics"]["auc"] == {"value": 0.9, "ci95": every.report["ci95"]["auc"]}
    for row, arm in zip(study["arms"], arms):
        external, delta = arm.report["external"], arm.report["external_delta"]
        assert row["n_external"] == 40 and row["n_train_patients"] == arm.n_train_patients
        for name in study["metrics"]:
            assert row["external"][name] == {"value": external["overall"][name], "ci95": external["ci95"][name]}
            assert row["internal"][name] == {"value": arm.report["overall"][name], "ci95": arm.report["ci95"][name]}
            assert row["delta"][name] == {"value": delta[name], "ci95": delta["ci95"][name]}
    assert study["arms"][0]["delta"]["auc"]["value"] == pytest.approx(0.7 - 0.88)
    page = write_study_html(study, tmp_path / "study.html").read_text()
    assert page.count("<img alt='study figure'") == len(study["metrics"]) and "every site (registered)" in page
