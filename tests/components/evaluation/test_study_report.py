"""A label-fraction study's report: each arm's figures as its report.json has them, and a plot per metric."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from components.evaluation.declarations import metrics_for
from components.errors import EvaluationError
from components.evaluation.study import Arm, cv_study, fraction_study, site_study, write_study_html


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


def test_an_arm_without_a_figure_or_with_its_point_outside_its_interval_still_renders(tmp_path):
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


def test_cross_validation_figures_equal_scikit_learns_on_the_same_predictions(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    manifest = pd.DataFrame({"case_id": [f"C{i}" for i in range(n)], "patient_id": [f"P{i // 2}" for i in range(n)],
                             "label": rng.integers(0, 2, n), "split": ["test"] * 100 + ["train"] * 200})
    def table(cases: pd.DataFrame, noise: float) -> pd.DataFrame:  # noqa: E306
        p1 = np.clip(cases["label"] * 0.6 + rng.normal(0.2, noise, len(cases)), 0.01, 0.99)
        return pd.DataFrame({"case_id": cases["case_id"], "y_true": cases["label"], "prob": p1})  # the binary contract
    pool, test = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "test"]
    vals = [table(pool.iloc[k::3], 0.3 + 0.1 * k) for k in range(3)]
    tests = [table(test, 0.3 + 0.1 * k) for k in range(3)]
    plain = Arm(1.0, 100, "plain", _report(0.9))
    folds = [Arm(1.0, 66, f"fold{k}", _report(0.8)) for k in range(3)]
    study = cv_study(plain, folds, vals, tests, manifest, threshold=0.5, n_bootstrap=50, seed=0, min_group_size=5)

    per_fold = [roc_auc_score(v["y_true"], v["prob"]) for v in vals]
    assert [f["metrics"]["auc"] for f in study["per_fold"]] == pytest.approx(per_fold)
    assert study["mean"]["auc"] == pytest.approx(np.mean(per_fold))
    assert study["sd"]["auc"] == pytest.approx(np.std(per_fold, ddof=1))
    pooled = pd.concat(vals)
    assert study["out_of_fold"]["n"] == 200
    assert study["out_of_fold"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(pooled["y_true"], pooled["prob"]))
    low, high = study["out_of_fold"]["metrics"]["auc"]["ci95"]
    assert low < study["out_of_fold"]["metrics"]["auc"]["value"] < high
    mean_prob = np.mean([t["prob"].to_numpy() for t in tests], axis=0)
    assert study["ensemble"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(test["label"], mean_prob))
    assert study["ensemble"]["metrics"]["brier"]["value"] == pytest.approx(
        brier_score_loss(test["label"], mean_prob))
    assert study["all_data"]["metrics"]["auc"]["value"] == 0.9 and study["all_data"]["run_id"] == "plain"
    page = write_study_html(study, tmp_path / "study.html").read_text()
    assert page.count("<img alt='study figure'") == len(study["metrics"]) and "fold ensemble on the test split" in page

    with pytest.raises(EvaluationError, match="is in the val split of two folds"):
        cv_study(plain, folds, [vals[0], vals[1], vals[0]], tests, manifest, threshold=0.5, n_bootstrap=0, seed=0,
                 min_group_size=5)


@pytest.mark.parametrize("select_by", ["auc", "brier"])
def test_nested_cross_validation_chooses_per_outer_fold_by_the_inner_folds_and_pools_the_choices(tmp_path, select_by):
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from components.evaluation.study import nested_cv

    rng = np.random.default_rng(1)
    n = 240
    manifest = pd.DataFrame({"case_id": [f"C{i}" for i in range(n)], "patient_id": [f"P{i // 2}" for i in range(n)],
                             "label": rng.integers(0, 2, n), "split": ["train"] * n})
    cases = [manifest.iloc[k::3] for k in range(3)]

    def table(fold: int, noise: float) -> pd.DataFrame:
        part = cases[fold]
        prob = np.clip(part["label"] * 0.6 + rng.normal(0.2, noise, len(part)), 0.01, 0.99)
        return pd.DataFrame({"case_id": part["case_id"], "y_true": part["label"], "prob": prob})

    noise = {0: 0.25, 1: 0.45}  # candidate 0 is the better one, except inside outer fold 2's inner folds
    folds = [[table(f, noise[c]) for f in range(3)] for c in (0, 1)]
    inner = {(c, f, j): table(j, noise[1 - c] if f == 2 else noise[c]) for c in (0, 1) for f in range(3)
             for j in range(3) if j != f}
    score = (lambda t: roc_auc_score(t["y_true"], t["prob"])) if select_by == "auc" else (
        lambda t: -brier_score_loss(t["y_true"], t["prob"]))  # higher is better, either way
    nested = nested_cv([{"train.lr": 0.01}, {"train.lr": 0.001}], folds, inner, manifest, select_by=select_by,
                       names=["auc", "brier"], threshold=0.5, n_bootstrap=50, seed=0, min_group_size=5)

    expected = [int(np.argmax([np.mean([score(inner[c, f, j]) for j in range(3) if j != f]) for c in (0, 1)]))
                for f in range(3)]
    assert [f["chosen"] for f in nested["per_fold"]] == expected == [0, 0, 1]
    pooled = pd.concat([folds[c][f] for f, c in enumerate(expected)])
    assert nested["estimate"]["n"] == n
    assert nested["estimate"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(pooled["y_true"], pooled["prob"]))
    sign = 1 if select_by == "auc" else -1
    assert nested["cv_mean"] == pytest.approx([sign * np.mean([score(t) for t in folds[c]]) for c in (0, 1)])
    assert nested["chosen"] == 0  # best over the outer folds themselves
    study = {"design": "cross_validation", "folds": 3, "metrics": ["auc"], "nested": nested,
             "per_fold": [{"fold": f, "n_val": 80, "metrics": {"auc": 0.9}, "run_id": f"r{f}"} for f in range(3)],
             "mean": {"auc": 0.9}, "sd": {"auc": 0.01},
             **{key: {"n": 1, "n_test": 1, "run_id": "plain", "metrics": {"auc": {"value": 0.9, "ci95": [0.8, 0.95]}}}
                for key in ("out_of_fold", "ensemble", "all_data")}}
    page = write_study_html(study, tmp_path / "study.html").read_text()
    assert f"nested estimate (choosing by {select_by} included)" in page and "candidate 1: train.lr=0.001" in page


def test_a_selection_metric_that_is_not_a_summary_metric_is_refused_naming_the_closest():
    from components.errors import ConfigError
    from components.evaluation.study import check_select_by

    with pytest.raises(ConfigError, match=r"study.select_by 'acu' is not a summary metric .*did you mean 'auc'\?"):
        check_select_by("acu", ["auc", "ece", "brier"])
    check_select_by("ece", ["auc", "ece", "brier"])
