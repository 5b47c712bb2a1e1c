"""Property tests: what must hold for any predictions, not only the examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.evaluation.bootstrap import weighted_metrics
from components.evaluation.metrics import classification_metrics
from components.evaluation.report import evaluate_predictions


@st.composite
def binary_predictions(draw, min_size=4, max_size=60):
    n = draw(st.integers(min_size, max_size))
    y = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    # probabilities on a coarse grid, so ties happen as they do in real scores
    prob = np.array(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))) / 20
    return y, prob


@settings(max_examples=60, deadline=None)
@given(binary_predictions(), st.randoms(use_true_random=False))
def test_the_report_does_not_depend_on_row_order(data, random):
    y, prob = data
    ids = [f"C{i}" for i in range(len(y))]
    predictions = pd.DataFrame({"case_id": ids, "y_true": y, "prob": prob})
    manifest = pd.DataFrame({"case_id": ids, "sex": ["F" if i % 2 else "M" for i in range(len(y))]})
    order = list(range(len(y)))
    random.shuffle(order)
    a = evaluate_predictions(predictions, manifest, n_bootstrap=0, min_group_size=1).to_dict()
    b = evaluate_predictions(predictions.iloc[order], manifest, n_bootstrap=0, min_group_size=1).to_dict()
    assert a["overall"].pop("notes", None) == b["overall"].pop("notes", None)
    assert a["overall"] == pytest.approx(b["overall"], nan_ok=True)
    assert a["fairness"]["sex"]["auc_gap"] == pytest.approx(b["fairness"]["sex"]["auc_gap"], nan_ok=True)


@settings(max_examples=60, deadline=None)
@given(binary_predictions())
def test_a_perfect_predictor_scores_perfectly(data):
    y, _ = data
    m = classification_metrics(y, y.astype(float))
    assert m["accuracy"] == 1 and m["ece"] == 0 and m["brier"] == 0
    assert m["auc"] == (1.0 if len(set(y)) == 2 else None)


@settings(max_examples=60, deadline=None)
@given(binary_predictions(), st.integers(0, 20))
def test_a_constant_predictor_has_chance_auc_and_known_calibration(data, level):
    y, _ = data
    c = level / 20
    m = classification_metrics(y, np.full(len(y), c))
    if len(set(y)) == 2:
        assert m["auc"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(abs(y.mean() - c))
    assert m["sensitivity"] == (1.0 if c >= 0.5 and y.any() else 0.0)


@settings(max_examples=60, deadline=None)
@given(binary_predictions(), st.data())
def test_integer_weights_equal_repeated_rows(data, draw):
    """A bootstrap resample is the data with rows repeated: the weighted metrics must say the same."""
    y, prob = data
    counts = np.array(draw.draw(st.lists(st.integers(0, 3), min_size=len(y), max_size=len(y))))
    if counts.sum() == 0:
        return
    repeated = classification_metrics(np.repeat(y, counts), np.repeat(prob, counts))
    weighted = weighted_metrics(y, prob, counts[None, :].astype(float), threshold=0.5)
    for name, value in repeated.items():
        if name == "notes":
            continue
        if value is None:
            assert np.isnan(weighted[name][0])
        else:
            assert weighted[name][0] == pytest.approx(value, abs=1e-9), name


@st.composite
def grouped_predictions(draw):
    y, prob = draw(binary_predictions(min_size=12, max_size=60))
    n = len(y)
    sex = np.array(draw(st.lists(st.sampled_from(["F", "M"]), min_size=n, max_size=n)))
    patients = np.arange(n) // draw(st.integers(1, 3))
    return y, prob, sex, patients


@settings(max_examples=40, deadline=None)
@given(grouped_predictions(), st.integers(0, 10_000))
def test_every_reported_interval_holds_its_estimate(data, seed):
    """Overall metrics, group metrics and fairness gaps: a 95% interval never leaves out its own estimate."""
    y, prob, sex, patients = data
    ids = [f"C{i}" for i in range(len(y))]
    predictions = pd.DataFrame({"case_id": ids, "y_true": y, "prob": prob})
    manifest = pd.DataFrame({"case_id": ids, "patient_id": [f"P{p}" for p in patients], "sex": sex})
    report = evaluate_predictions(predictions, manifest, attributes=["sex"], n_bootstrap=60, seed=seed,
                                  min_group_size=1).to_dict()
    pairs = [(report["overall"][m], ci) for m, ci in report["ci95"].items()]
    for group in report["groups"]["sex"].values():
        pairs += [(group[m], ci) for m, ci in (group.get("ci95") or {}).items()]
    fairness = report["fairness"]["sex"]
    pairs += [(fairness[m], ci) for m, ci in (fairness.get("ci95") or {}).items()]
    for estimate, interval in pairs:
        if estimate is None or interval is None:
            continue
        assert interval[0] - 1e-9 <= estimate <= interval[1] + 1e-9, (estimate, interval)
