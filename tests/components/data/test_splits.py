from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.data.splits import assign_splits


def _cohort(n_patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label, site = int(rng.random() < 0.3), f"s{rng.integers(3)}"
        rows += [{"patient_id": f"P{p:04d}", "label": label, "site": site} for _ in range(rng.integers(1, 4))]
    return pd.DataFrame(rows)


def test_every_image_of_a_patient_shares_a_split():
    cases = _cohort(300)
    cases["split"] = assign_splits(cases, val=0.2, test=0.2, seed=0)
    assert (cases.groupby("patient_id")["split"].nunique() == 1).all()


def test_deterministic_for_a_seed_and_different_across_seeds():
    cases = _cohort(300)
    a = assign_splits(cases, val=0.2, test=0.2, seed=0)
    b = assign_splits(cases.sample(frac=1, random_state=1), val=0.2, test=0.2, seed=0).sort_index()
    c = assign_splits(cases, val=0.2, test=0.2, seed=1)
    assert a.equals(b)
    assert not a.equals(c)


@pytest.mark.parametrize(("val", "test"), [(0.2, 0.2), (0.1, 0.3), (0.0, 0.25)])
def test_fractions_hold_within_each_label_stratum(val, test):
    cases = _cohort(600)
    cases["split"] = assign_splits(cases, val=val, test=test, seed=0)
    patients = cases.groupby("patient_id").agg(label=("label", "max"), split=("split", "first"))
    for _, stratum in patients.groupby("label"):
        shares = stratum["split"].value_counts(normalize=True)
        assert shares.get("test", 0) == pytest.approx(test, abs=0.03)
        assert shares.get("val", 0) == pytest.approx(val, abs=0.03)
