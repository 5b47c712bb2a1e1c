"""Classification metrics of one set of predictions, from scikit-learn and torchmetrics.

Layouts: ``y_true`` is (N,) integer classes; ``prob`` is (N,) positive-class
probability for a binary task or (N, K) class probabilities for K >= 3. A
multi-label task has ``y_true`` (N, L) of 0/1 and ``prob`` (N, L) independent
per-label probabilities; each metric is the macro mean over labels.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    log_loss,
    recall_score,
    roc_auc_score,
)
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1", "ece", "mce", "brier", "nll")
ECE_BINS = 15


def _specificity(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> float:
    """TN / (TN + FP): of class 1 for a binary task (the negative-class recall), else the mean over classes."""
    cm = confusion_matrix(y_true, y_pred, labels=classes)
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = cm.sum() - cm.sum(axis=1) - fp
    spec = tn / np.maximum(tn + fp, 1)
    return float(spec[1] if len(classes) == 2 else spec.mean())


def auc_or_reason(y_true: np.ndarray, prob: np.ndarray) -> tuple[float | None, str | None]:
    """ROC AUC (macro one-vs-rest for multiclass) or ``(None, why)`` where it is undefined."""
    present = np.unique(y_true)
    n_classes = 2 if prob.ndim == 1 else prob.shape[1]
    if len(present) < 2:
        return None, f"only one class ({int(present[0]) if len(present) else 'none'}) present"
    if prob.ndim == 2 and len(present) < n_classes:
        missing = sorted(set(range(n_classes)) - set(present.tolist()))
        return None, f"class(es) {missing} absent, so one-vs-rest AUC is undefined"
    if prob.ndim == 1:
        return float(roc_auc_score(y_true, prob)), None
    return float(roc_auc_score(y_true, prob, multi_class="ovr", average="macro", labels=range(n_classes))), None


def classification_metrics(y_true: np.ndarray, prob: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Every metric of the evaluation contract for one set of predictions.

    Args:
        y_true: (N,) integer classes.
        prob: (N,) positive-class probability (binary) or (N, K) class probabilities.
        threshold: decision threshold on the positive-class probability (binary only).

    Returns:
        ``{metric: value}`` for :data:`METRICS`, AUC None where undefined, plus
        ``notes`` (metric -> reason) for the metrics left out.
    """
    y_true = np.asarray(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64)
    if y_true.ndim == 2:
        return multilabel_metrics(y_true, prob, threshold=threshold)
    auc, why = auc_or_reason(y_true, prob)
    target = torch.tensor(y_true)
    if prob.ndim == 1:
        classes = np.array([0, 1])
        y_pred = (prob >= threshold).astype(int)
        preds = torch.tensor(prob)
        ece = binary_calibration_error(preds, target, n_bins=ECE_BINS, norm="l1")
        mce = binary_calibration_error(preds, target, n_bins=ECE_BINS, norm="max")
        brier = brier_score_loss(y_true, prob, pos_label=1)
        nll = log_loss(y_true, np.column_stack([1 - prob, prob]), labels=classes)
        sensitivity = recall_score(y_true, y_pred, pos_label=1, zero_division=0)
        f1 = f1_score(y_true, y_pred, pos_label=1, zero_division=0)
    else:
        k = prob.shape[1]
        classes = np.arange(k)
        y_pred = prob.argmax(axis=1)
        preds = torch.tensor(prob)
        ece = multiclass_calibration_error(preds, target, num_classes=k, n_bins=ECE_BINS, norm="l1")
        mce = multiclass_calibration_error(preds, target, num_classes=k, n_bins=ECE_BINS, norm="max")
        brier = np.mean(np.sum((prob - np.eye(k)[y_true]) ** 2, axis=1))
        nll = log_loss(y_true, prob, labels=classes)
        sensitivity = recall_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
        f1 = f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)
    result = {
        "auc": auc,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "sensitivity": float(sensitivity),
        "specificity": _specificity(y_true, y_pred, classes),
        "f1": float(f1),
        "ece": float(ece),
        "mce": float(mce),
        "brier": float(brier),
        "nll": float(nll),
    }
    if why:
        result["notes"] = {"auc": why}
    return result


def multilabel_metrics(y_true: np.ndarray, prob: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Macro means over labels of the binary metrics; labels with one class are left out of the AUC.

    Args:
        y_true: (N, L) 0/1 per label.
        prob: (N, L) probability of each label.
        threshold: decision threshold of every label.
    """
    per_label = [classification_metrics(y_true[:, j], prob[:, j], threshold=threshold) for j in range(y_true.shape[1])]
    result = {name: float(np.mean([m[name] for m in per_label])) for name in METRICS if name != "auc"}
    aucs = [m["auc"] for m in per_label if m["auc"] is not None]
    result["auc"] = float(np.mean(aucs)) if aucs else None
    undefined = [j for j, m in enumerate(per_label) if m["auc"] is None]
    if undefined:
        result["notes"] = {"auc": f"label(s) {undefined} have one class: left out of the macro AUC"}
    return {name: result[name] for name in (*METRICS, "notes") if name in result}
