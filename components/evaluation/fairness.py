"""Subgroup metrics and fairness gaps.

Grouped metrics come from fairlearn's ``MetricFrame``; equalized-odds and
demographic-parity differences from ``fairlearn.metrics``. Equity-scaled AUC
(ES-AUC) is in no library, so it is written here:
``AUC / (1 + sum_g |AUC_g - AUC|)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference

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
    features = groups.fillna("unknown").astype(str).to_numpy()
    frame = MetricFrame(
        metrics={"all": lambda yt, yp: classification_metrics(yt, yp, threshold=threshold, settings=settings),
                 "n": lambda yt, yp: len(yt)},
        y_true=np.asarray(y_true),
        y_pred=np.asarray(prob),
        sensitive_features=features,
    )
    by_group = frame.by_group
    return {str(g): {"n": int(by_group.at[g, "n"]), **by_group.at[g, "all"]} for g in by_group.index}


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
        y_pred = (prob[mask] >= threshold).astype(int)
        features = groups.fillna("unknown").astype(str).to_numpy()[mask]
        summary["equalized_odds_difference"] = _finite_or_none(
            equalized_odds_difference(y_true[mask], y_pred, sensitive_features=features)
        )
        summary["demographic_parity_difference"] = _finite_or_none(
            demographic_parity_difference(y_true[mask], y_pred, sensitive_features=features)
        )
    else:
        summary["equalized_odds_difference"] = summary["demographic_parity_difference"] = None
        reason = "defined for binary tasks only" if prob.ndim == 2 else "needs two groups large enough"
        notes["equalized_odds_difference"] = notes["demographic_parity_difference"] = reason
    if notes:
        summary["notes"] = notes
    return summary
