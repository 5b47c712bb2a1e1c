"""The shortcut audit: does the model's representation encode who the patient is?

For each declared attribute (sex, age group, race, site), a linear probe (scikit-learn's
logistic regression on standardised features) is fitted on the training split's
penultimate features and scored on the test split: ``shortcuts.<attribute>.auc`` is its
ROC AUC (macro one-vs-rest over the attribute's groups; 0.5 means the features do not
tell the groups apart), with a patient-level bootstrap (BCa) interval over the test cases.
After "Disentanglement and Assessment of Shortcuts in Ophthalmological Retinal Imaging
Exams" (a probe on frozen features; a high AUC is a shortcut the classifier may use).

It judges feature tables only; :mod:`components.inference` extracts the features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from components.evaluation.bootstrap import jackknife_rows, resample_patients, weighted_auc
from components.evaluation.intervals import bca_interval

PROBE_MAX_ITER = 1000
SCALER_ROWS = 2048  # the probe's scaler's rows per pass (probe)


def probe_cases(train: pd.DataFrame, *, limit: int | None, seed: int) -> pd.DataFrame:
    """The training rows the probe is fitted on: all of them up to ``limit``, else ``limit`` rows drawn at random
    with ``seed``, in the manifest's order. A linear probe of an attribute's few groups is well determined by
    thousands of cases, and each case left out is an image the evaluation does not read and embed again: at
    100,000 images the training split's 55,330 were more than the val and test splits' 44,774 it predicts."""
    if limit is None or len(train) <= limit:
        return train
    return train.sample(n=limit, random_state=seed).sort_index()


def probe(train_features: np.ndarray, train_groups: np.ndarray, *, rows_per_pass: int = SCALER_ROWS):
    """The fitted linear probe: standardised features, multinomial logistic regression. The scaler is fitted
    ``rows_per_pass`` rows at a time (``partial_fit``): its variance pass makes a float64 copy of the rows it is
    given, which for 20,000 cases' DenseNet121 features in one pass is 164 MB."""
    scaler = StandardScaler()
    for start in range(0, len(train_features), rows_per_pass):
        scaler.partial_fit(train_features[start:start + rows_per_pass])
    head = LogisticRegression(max_iter=PROBE_MAX_ITER).fit(scaler.transform(train_features), train_groups)
    return make_pipeline(scaler, head)


def macro_auc(groups: np.ndarray, prob: np.ndarray, classes: Sequence[str], weights: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest AUC over the classes present in ``groups`` for each weight row (B, N) -> (B,)
    (as scikit-learn's ``roc_auc_score(multi_class="ovr")`` when every class is present)."""
    present = [j for j, c in enumerate(classes) if (groups == c).any() and (groups != c).any()]
    if len(classes) == 2:  # a binary attribute: the AUC of the second class (the first's is the same)
        present = [1]
    per_class = [weighted_auc(prob[:, j], groups == classes[j], weights) for j in present]
    with np.errstate(invalid="ignore"):
        return np.mean(per_class, axis=0)


def rows(features: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``features[mask]``, without the copy where every row is kept (most attributes: 20,000 training cases'
    features of DenseNet121 are 82 MB)."""
    return features if mask.all() else features[mask]


def audit_attribute(
    train_features: np.ndarray, train_groups: pd.Series, test_features: np.ndarray, test_groups: pd.Series,
    test_patients: np.ndarray, *, n_bootstrap: int, seed: int, min_group_size: int, level: float = 0.95,
) -> dict:
    """The shortcut AUC of one attribute: ``{auc, ci95, n_train, n_test, groups, reason}``.

    Groups with fewer than ``min_group_size`` training cases, and cases without the attribute, are left
    out; the AUC is null (with the reason) when fewer than two groups remain on either split.
    """
    train_groups, test_groups = train_groups.astype("string"), test_groups.astype("string")
    counts = train_groups.value_counts()
    kept = sorted(str(g) for g in counts[counts >= min_group_size].index)
    out: dict = {"auc": None, "ci95": None, "n_train": 0, "n_test": 0, "groups": kept, "reason": None}
    if len(kept) < 2:
        out["reason"] = (f"fewer than two groups with {min_group_size}+ training cases "
                         f"({', '.join(f'{g}: {n}' for g, n in counts.items()) or 'none'})")
        return out
    train_mask = train_groups.isin(kept).to_numpy(dtype=bool)
    test_mask = test_groups.isin(kept).to_numpy(dtype=bool)
    y_test = test_groups[test_mask].astype(str).to_numpy()
    out["n_train"], out["n_test"] = int(train_mask.sum()), int(test_mask.sum())
    if len(np.unique(y_test)) < 2:
        out["reason"] = f"the test split holds one group only ({', '.join(np.unique(y_test)) or 'none'})"
        return out
    model = probe(rows(train_features, train_mask), train_groups[train_mask].astype(str).to_numpy())
    classes = [str(c) for c in model.classes_]
    prob = model.predict_proba(rows(test_features, test_mask))
    out["auc"] = float(macro_auc(y_test, prob, classes, np.ones((1, len(y_test))))[0])
    if n_bootstrap:
        codes = np.unique(np.asarray(test_patients)[test_mask], return_inverse=True)[1]
        rng = np.random.default_rng(seed)
        n_patients = int(codes.max()) + 1
        values = [macro_auc(y_test, prob, classes, drawn[:, codes])
                  for drawn in resample_patients(n_patients, n_resamples=n_bootstrap, rng=rng)]
        jackknifed = [macro_auc(y_test, prob, classes, rows[:, codes]) for rows in jackknife_rows(n_patients)]
        out["ci95"] = bca_interval(out["auc"], np.concatenate(values), np.concatenate(jackknifed), level)
    return out


def shortcut_audit(
    train_features: np.ndarray, train: pd.DataFrame, test_features: np.ndarray, test: pd.DataFrame, *,
    attributes: Sequence[str], n_bootstrap: int, seed: int, min_group_size: int,
) -> dict:
    """``{attribute: audit_attribute(...)}`` for each declared attribute the manifest rows carry
    (``train``/``test``: manifest rows in the order of the feature rows, with ``patient_id``)."""
    return {
        attribute: audit_attribute(
            train_features, train[attribute], test_features, test[attribute], test["patient_id"].to_numpy(),
            n_bootstrap=n_bootstrap, seed=seed, min_group_size=min_group_size)
        for attribute in attributes if attribute in train.columns and attribute in test.columns
    }
