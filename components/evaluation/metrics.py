"""Classification metrics of one set of predictions: every declared metric's point function
(:mod:`components.evaluation.declarations`: scikit-learn and torchmetrics).

Layouts: ``y_true`` is (N,) integer classes; ``prob`` is (N,) positive-class
probability for a binary task or (N, K) class probabilities for K >= 3. A
multi-label task has ``y_true`` (N, L) of 0/1 and ``prob`` (N, L) independent
per-label probabilities; each metric is the macro mean over labels.
"""

from __future__ import annotations

import numpy as np

from components.evaluation.declarations import ECE_BINS, MetricSettings, auc_or_reason, metrics_for

__all__ = ["ECE_BINS", "METRICS", "auc_or_reason", "classification_metrics", "multilabel_metrics", "per_class_auc"]

METRICS = tuple(m.name for m in metrics_for("binary"))


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, *, threshold: float = 0.5,
                           settings: MetricSettings = MetricSettings()) -> dict:
    """Every declared metric of a classification task for one set of predictions.

    Args:
        y_true: (N,) integer classes, or (N, L) 0/1 labels (multi-label).
        prob: (N,) positive-class probability (binary), (N, K) class probabilities or (N, L) label probabilities.
        threshold: decision threshold on the positive-class probability (binary and multi-label).
        settings: the target specificity, and whether the classes are ordered grades.

    Returns:
        ``{metric: value}`` for :data:`METRICS`, AUC None where undefined, plus
        ``notes`` (metric -> reason) for the metrics left out.
    """
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    if y_true.ndim == 2:
        return multilabel_metrics(y_true, prob, threshold=threshold, settings=settings)
    task = "binary" if prob.ndim == 1 else "multiclass"
    result = {m.name: m.compute(y_true, prob, threshold, settings) for m in metrics_for(task, ordinal=settings.ordinal)}
    why = auc_or_reason(y_true, prob)[1]
    if why:
        result["notes"] = {"auc": why}
    return result


def multilabel_metrics(y_true: np.ndarray, prob: np.ndarray, *, threshold: float = 0.5,
                       settings: MetricSettings = MetricSettings()) -> dict:
    """Macro means over labels of the binary metrics; labels with one class are left out of the AUC.

    Args:
        y_true: (N, L) 0/1 per label.
        prob: (N, L) probability of each label.
        threshold: decision threshold of every label.
    """
    binary = MetricSettings(specificity=settings.specificity)  # a label is present or not: no grades
    per_label = [classification_metrics(y_true[:, j], prob[:, j], threshold=threshold, settings=binary)
                 for j in range(y_true.shape[1])]
    result = {name: _mean_defined([m[name] for m in per_label]) for name in METRICS if name != "auc"}
    aucs = [m["auc"] for m in per_label if m["auc"] is not None]
    result["auc"] = float(np.mean(aucs)) if aucs else None
    undefined = [j for j, m in enumerate(per_label) if m["auc"] is None]
    if undefined:
        result["notes"] = {"auc": f"label(s) {undefined} have one class: left out of the macro AUC"}
    return {name: result[name] for name in (*METRICS, "notes") if name in result}


def _mean_defined(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def per_class_auc(y_true: np.ndarray, prob: np.ndarray) -> dict[str, dict]:
    """Each class's (multiclass, one-vs-rest) or label's (multi-label) ROC AUC by scikit-learn, with its number
    of positive cases: ``{"<k>": {"n_positive": ..., "auc": ... or None, "note": why (when None)}}``."""
    y_true = np.asarray(y_true).astype(int)
    columns = range(prob.shape[1])
    result = {}
    for k in columns:
        positive = y_true[:, k] == 1 if y_true.ndim == 2 else y_true == k
        auc, why = auc_or_reason(positive.astype(int), prob[:, k])
        result[str(k)] = {"n_positive": int(positive.sum()), "auc": auc, **({"note": why} if why else {})}
    return result
