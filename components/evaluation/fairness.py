"""Subgroup metrics and fairness gaps.

A group's metrics are the contract's metrics of its cases; equalized-odds and
demographic-parity differences come from ``fairlearn.metrics``, given each
distinct (label, decision, group) once with its count as the sample weight:
fairlearn 0.15's ``MetricFrame`` stacks its inputs one element at a time
(``np.stack`` of every case), about 5 s per attribute at 100,000 cases, and the
weighted rates are the same. Equity-scaled AUC (ES-AUC) is in no library, so it
is written here: ``AUC / (1 + sum_g |AUC_g - AUC|)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from components.evaluation.declarations import MetricSettings
from components.evaluation.metrics import classification_metrics


def group_metrics(
    y_true: np.ndarray, prob: np.ndarray, groups: pd.Series, *, threshold: float,
    settings: MetricSettings = MetricSettings(),
) -> dict[str, dict]:
    """Metrics of every group of one attribute: ``{group: {"n": ..., metric: ...}}``.

    Args:
        y_true: (N,) integer classes.
        prob: (N,) or (N, K) probabilities.
        groups: (N,) group of each case; missing values become the group ``unknown``.
        threshold: decision threshold (binary).
    """
    codes, names = pd.factorize(groups.fillna("unknown").astype(str), sort=True)
    y_true, prob = np.asarray(y_true), np.asarray(prob)
    by_group = {}
    for code, group in enumerate(names):
        mask = codes == code
        metrics = classification_metrics(y_true[mask], prob[mask], threshold=threshold, settings=settings)
        by_group[str(group)] = {"n": int(mask.sum()), **metrics}
    return by_group


def equity_scaled(overall: float | None, by_group: Mapping[str, float | None]) -> float | None:
    """Equity-scaled metric: ``overall / (1 + sum_g |m_g - overall|)`` over groups with a value.

    Returns None when the overall value is None or no group has a value.
    """
    values = [v for v in by_group.values() if v is not None]
    if overall is None or not values:
        return None
    return overall / (1.0 + sum(abs(v - overall) for v in values))


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def fairness_summary(
    y_true: np.ndarray,
    prob: np.ndarray,
    groups: pd.Series,
    by_group: Mapping[str, dict],
    *,
    overall_auc: float | None,
    threshold: float,
    min_group_size: int,
) -> dict:
    """Fairness figures of one attribute, over groups with at least ``min_group_size`` cases.

    Returns:
        ``auc_gap`` (max - min group AUC), ``es_auc``, ``equalized_odds_difference`` and
        ``demographic_parity_difference`` (binary only, at ``threshold``), the groups
        used, and ``notes`` saying why a figure is None.
    """
    eligible = [g for g, m in by_group.items() if m["n"] >= min_group_size]
    aucs = {g: by_group[g]["auc"] for g in eligible}
    known = [a for a in aucs.values() if a is not None]
    notes = {}
    if len(known) >= 2:
        auc_gap = max(known) - min(known)
    else:
        auc_gap = None
        notes["auc_gap"] = f"needs two groups of >= {min_group_size} cases with an AUC, found {len(known)}"
    summary = {"groups_compared": eligible, "auc_gap": auc_gap, "es_auc": equity_scaled(overall_auc, aucs)}
    if summary["es_auc"] is None:
        notes["es_auc"] = "no overall AUC or no group with an AUC"
    mask = groups.fillna("unknown").astype(str).isin(eligible).to_numpy()
    if prob.ndim == 1 and len(eligible) >= 2:
        # each distinct (label, decision, group) once, weighted by its count (see the module docstring)
        cases = pd.DataFrame({"y_true": y_true[mask], "y_pred": (prob[mask] >= threshold).astype(int),
                              "group": groups.fillna("unknown").astype(str).to_numpy()[mask]})
        distinct = cases.value_counts().reset_index()
        weighed = dict(sensitive_features=distinct["group"].to_numpy(), sample_weight=distinct["count"].to_numpy())
        summary["equalized_odds_difference"] = _finite_or_none(
            equalized_odds_difference(distinct["y_true"].to_numpy(), distinct["y_pred"].to_numpy(), **weighed)
        )
        summary["demographic_parity_difference"] = _finite_or_none(
            demographic_parity_difference(distinct["y_true"].to_numpy(), distinct["y_pred"].to_numpy(), **weighed)
        )
    else:
        summary["equalized_odds_difference"] = summary["demographic_parity_difference"] = None
        reason = "defined for binary tasks only" if prob.ndim == 2 else "needs two groups large enough"
        notes["equalized_odds_difference"] = notes["demographic_parity_difference"] = reason
    if notes:
        summary["notes"] = notes
    return summary
