"""Every metric medflow reports, declared once: its name, whether higher is better, the tasks it
applies to, its point function (scikit-learn or torchmetrics), its weighted form (for the vectorised
patient-level bootstrap and non-inferiority) and where it shows up (calibration tables, registry tags,
the run summary). report.json, the CIs, non-inferiority, registry tags, the model card and the HTML
report read these declarations; a new metric is added here and nowhere beside it.

Layouts of the point functions: ``y_true`` (N,) integer classes; ``prob`` (N,) positive-class
probability (binary) or (N, K) class probabilities (multiclass); multi-label tasks average the
binary form over labels (:func:`components.evaluation.metrics.multilabel_metrics`). Segmentation
metrics are computed per case by MONAI (:mod:`components.evaluation.segmentation`) and have no
point function here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    log_loss,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

ECE_BINS = 15
CLASSIFICATION_TASKS = frozenset({"binary", "multiclass", "multilabel"})
SEGMENTATION_TASKS = frozenset({"segmentation"})
PERFORMANCE, CALIBRATION, FAIRNESS = "performance", "calibration", "fairness"
SHORTCUT = "shortcut"  # how well the model's features predict a declared attribute (report.json ``shortcuts``)
DEFAULT_SPECIFICITY = 0.9


@dataclass(frozen=True)
class MetricSettings:
    """What some metrics need beyond the predictions: the specificity at which sensitivity is read
    (``evaluate.target_specificity``), and whether the classes are ordered grades (``data.ordinal``)."""

    specificity: float = DEFAULT_SPECIFICITY
    ordinal: bool = False


@dataclass(frozen=True)
class WeightedSums:
    """Weighted sums of one set of predictions for B weight rows, from which every weighted metric
    follows (see :class:`components.evaluation.bootstrap.WeightedMetrics`). Arrays are (B,) or (B, ...)."""

    binary: bool
    bin_count: np.ndarray  # (B, bins): weight per confidence bin
    bin_gap: np.ndarray  # (B, bins): weighted correct (binary: positives) minus weighted confidence, per bin
    tp: np.ndarray  # (B, K) per class
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray
    brier: np.ndarray  # (B,) weighted sum of per-case Brier terms
    nll: np.ndarray  # (B,) weighted sum of -log p(true class)
    total: np.ndarray  # (B,) total weight
    auc: np.ndarray  # (B,) weighted (macro one-vs-rest) AUC
    sensitivity_at_specificity: np.ndarray  # (B,) at the settings' specificity (macro one-vs-rest)
    confusion: np.ndarray  # (B, K, K) weighted confusion matrix, rows true class, columns predicted


@dataclass(frozen=True)
class MetricDeclaration:
    """One metric.

    Attributes:
        name: its key in report.json (``overall.<name>``).
        title: how tables and plots name it.
        higher_is_better: the direction (non-inferiority compares in it).
        tasks: the report tasks it applies to (binary, multiclass, multilabel, segmentation).
        kind: performance, calibration, fairness (a gap over an attribute's groups) or shortcut
            (``shortcuts.<attribute>.<key>``: an attribute predicted from the model's features).
        point: ``point(y_true, prob, threshold)`` for one set of classification predictions.
        weighted: the same metric for many weight rows at once, from :class:`WeightedSums`.
        tagged: registered versions carry it as a tag (``medflow.test_<name>``, or
            ``medflow.<attribute>_<name>`` for a fairness gap).
        summary: ``medflow run`` prints it in its summary.
        key: its key inside its section of report.json when not ``name`` (``shortcuts.<attribute>.auc``).
        settings: the point function takes the :class:`MetricSettings` as a fourth argument.
        ordinal: reported only for ordered grades (``data.ordinal``).
    """

    name: str
    title: str
    higher_is_better: bool
    tasks: frozenset[str]
    kind: str = PERFORMANCE
    point: Callable[[np.ndarray, np.ndarray, float], float | None] | None = None
    weighted: Callable[[WeightedSums], np.ndarray] | None = None
    tagged: bool = False
    summary: bool = False
    key: str | None = None
    settings: bool = False
    ordinal: bool = False

    def compute(self, y_true: np.ndarray, prob: np.ndarray, threshold: float,
                settings: MetricSettings = MetricSettings()) -> float | None:
        """The point value for one set of predictions."""
        return self.point(y_true, prob, threshold, settings) if self.settings else self.point(y_true, prob, threshold)

    @property
    def field(self) -> str:
        """Its key in report.json (within ``overall``, ``fairness.<attribute>`` or ``shortcuts.<attribute>``)."""
        return self.key or self.name


def _predicted(prob: np.ndarray, threshold: float) -> np.ndarray:
    return (prob >= threshold).astype(int) if prob.ndim == 1 else prob.argmax(axis=1)


def _classes(prob: np.ndarray) -> np.ndarray:
    return np.array([0, 1]) if prob.ndim == 1 else np.arange(prob.shape[1])


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


def _specificity(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    """TN / (TN + FP): of class 1 for a binary task (the negative-class recall), else the mean over classes."""
    classes = _classes(prob)
    cm = confusion_matrix(y_true, _predicted(prob, threshold), labels=classes)
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = cm.sum() - cm.sum(axis=1) - fp
    spec = tn / np.maximum(tn + fp, 1)
    return float(spec[1] if len(classes) == 2 else spec.mean())


def _recall(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    if prob.ndim == 1:
        return float(recall_score(y_true, _predicted(prob, threshold), pos_label=1, zero_division=0))
    return float(recall_score(y_true, _predicted(prob, threshold), labels=_classes(prob), average="macro",
                              zero_division=0))


def _f1(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float:
    if prob.ndim == 1:
        return float(f1_score(y_true, _predicted(prob, threshold), pos_label=1, zero_division=0))
    return float(f1_score(y_true, _predicted(prob, threshold), labels=_classes(prob), average="macro", zero_division=0))


def _calibration_error(norm: str) -> Callable[[np.ndarray, np.ndarray, float], float]:
    """torchmetrics' binary (positive-class probability) or multiclass (top-label confidence) calibration error."""
    def compute(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float:  # noqa: ARG001 (no threshold)
        preds, target = torch.tensor(prob), torch.tensor(y_true)
        if prob.ndim == 1:
            return float(binary_calibration_error(preds, target, n_bins=ECE_BINS, norm=norm))
        return float(multiclass_calibration_error(preds, target, num_classes=prob.shape[1], n_bins=ECE_BINS, norm=norm))
    return compute


def _brier(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float:  # noqa: ARG001
    if prob.ndim == 1:
        return float(brier_score_loss(y_true, prob, pos_label=1))
    return float(np.mean(np.sum((prob - np.eye(prob.shape[1])[y_true]) ** 2, axis=1)))


def _nll(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float:  # noqa: ARG001
    full = np.column_stack([1 - prob, prob]) if prob.ndim == 1 else prob
    return float(log_loss(y_true, full, labels=_classes(prob)))


def _sensitivity_at_specificity(y_true: np.ndarray, prob: np.ndarray, threshold: float,  # noqa: ARG001
                                settings: MetricSettings) -> float | None:
    """The highest sensitivity on the ROC curve (scikit-learn's, every threshold kept) whose specificity is at
    least the target: of the positive class (binary), else the mean over classes one-vs-rest."""
    scores = {1: prob} if prob.ndim == 1 else {c: prob[:, c] for c in range(prob.shape[1])}
    values = []
    for c, score in scores.items():
        positive = y_true == c
        if positive.all() or not positive.any():
            return None
        fpr, tpr, _ = roc_curve(positive, score, drop_intermediate=False)
        values.append(float(tpr[fpr <= 1 - settings.specificity + 1e-12].max()))
    return float(np.mean(values))


def _qwk(y_true: np.ndarray, prob: np.ndarray, threshold: float) -> float | None:
    k = 2 if prob.ndim == 1 else prob.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = cohen_kappa_score(y_true, _predicted(prob, threshold), weights="quadratic", labels=np.arange(k))
    return None if np.isnan(value) else float(value)


def _weighted_qwk(s: WeightedSums) -> np.ndarray:
    """Quadratic weighted kappa of each weighted confusion matrix (as cohen_kappa_score with sample_weight)."""
    observed = s.confusion
    k = observed.shape[-1]
    cost = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2 / max(k - 1, 1) ** 2
    total = observed.sum(axis=(1, 2))
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / np.where(total > 0, total, 1)[:, None, None]
    disagreement = (cost * expected).sum(axis=(1, 2))
    return np.where(disagreement > 0, 1 - (cost * observed).sum(axis=(1, 2)) / np.where(disagreement > 0, disagreement, 1),
                    np.nan)


def _per_class(s: WeightedSums, values: np.ndarray) -> np.ndarray:
    """The positive class's value (binary) or the macro mean over classes."""
    return values[:, 1] if s.binary else values.mean(axis=1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _bin_gaps(s: WeightedSums) -> np.ndarray:
    return np.abs(s.bin_gap)


METRICS: tuple[MetricDeclaration, ...] = (
    MetricDeclaration("auc", "AUC", True, CLASSIFICATION_TASKS, point=lambda y, p, t: auc_or_reason(y, p)[0],
                      weighted=lambda s: s.auc, tagged=True, summary=True),
    MetricDeclaration("accuracy", "accuracy", True, CLASSIFICATION_TASKS,
                      point=lambda y, p, t: float(accuracy_score(y, _predicted(p, t))),
                      weighted=lambda s: s.tp.sum(axis=1) / s.total, summary=True),
    MetricDeclaration("sensitivity", "sensitivity", True, CLASSIFICATION_TASKS, point=_recall,
                      weighted=lambda s: _per_class(s, _ratio(s.tp, s.tp + s.fn))),
    MetricDeclaration("specificity", "specificity", True, CLASSIFICATION_TASKS, point=_specificity,
                      weighted=lambda s: _per_class(s, _ratio(s.tn, s.tn + s.fp))),
    MetricDeclaration("f1", "F1", True, CLASSIFICATION_TASKS, point=_f1,
                      weighted=lambda s: _per_class(s, _ratio(2 * s.tp, 2 * s.tp + s.fp + s.fn))),
    MetricDeclaration("sensitivity_at_specificity", "sensitivity at specificity", True, CLASSIFICATION_TASKS,
                      point=_sensitivity_at_specificity, weighted=lambda s: s.sensitivity_at_specificity, settings=True),
    # ordered grades (diabetic retinopathy 0-4, Kellgren-Lawrence): quadratic weighted Cohen's kappa
    MetricDeclaration("qwk", "quadratic weighted kappa", True, frozenset({"binary", "multiclass"}), point=_qwk,
                      weighted=_weighted_qwk, ordinal=True, tagged=True, summary=True),
    MetricDeclaration("ece", "ECE", False, CLASSIFICATION_TASKS, kind=CALIBRATION, point=_calibration_error("l1"),
                      weighted=lambda s: _bin_gaps(s).sum(axis=1) / s.total, tagged=True, summary=True),
    MetricDeclaration("mce", "MCE", False, CLASSIFICATION_TASKS, kind=CALIBRATION, point=_calibration_error("max"),
                      weighted=lambda s: _ratio(_bin_gaps(s), s.bin_count).max(axis=1)),
    MetricDeclaration("brier", "Brier", False, CLASSIFICATION_TASKS, kind=CALIBRATION, point=_brier,
                      weighted=lambda s: s.brier / s.total, tagged=True, summary=True),
    MetricDeclaration("nll", "NLL", False, CLASSIFICATION_TASKS, kind=CALIBRATION, point=_nll,
                      weighted=lambda s: s.nll / s.total),
    MetricDeclaration("dice", "Dice", True, SEGMENTATION_TASKS, tagged=True, summary=True),
    MetricDeclaration("hd95", "HD95 (mm)", False, SEGMENTATION_TASKS, tagged=True, summary=True),
    MetricDeclaration("voxel_ece", "voxel ECE", False, SEGMENTATION_TASKS, kind=CALIBRATION, tagged=True,
                      summary=True),
    MetricDeclaration("voxel_mce", "voxel MCE", False, SEGMENTATION_TASKS, kind=CALIBRATION),
    MetricDeclaration("auc_gap", "AUC gap", False, CLASSIFICATION_TASKS, kind=FAIRNESS, tagged=True),
    MetricDeclaration("es_auc", "ES-AUC", True, CLASSIFICATION_TASKS, kind=FAIRNESS),
    MetricDeclaration("dice_gap", "Dice gap", False, SEGMENTATION_TASKS, kind=FAIRNESS, tagged=True),
    MetricDeclaration("es_dice", "ES-Dice", True, SEGMENTATION_TASKS, kind=FAIRNESS),
    MetricDeclaration("equalized_odds_difference", "equalized-odds difference", False,
                      frozenset({"binary", "multiclass"}), kind=FAIRNESS),
    MetricDeclaration("demographic_parity_difference", "demographic-parity difference", False,
                      frozenset({"binary", "multiclass"}), kind=FAIRNESS),
    # a linear probe on the penultimate features predicting the attribute, scored on test: 0.5 is no shortcut
    MetricDeclaration("shortcut_auc", "shortcut AUC", False, CLASSIFICATION_TASKS, kind=SHORTCUT, tagged=True,
                      key="auc"),
)
BY_NAME = {m.name: m for m in METRICS}


def metric(name: str) -> MetricDeclaration:
    """The declaration called ``name`` (KeyError when none is)."""
    return BY_NAME[name]


def metrics_for(task: str, *, kind: tuple[str, ...] | None = (PERFORMANCE, CALIBRATION),
                ordinal: bool = False) -> tuple[MetricDeclaration, ...]:
    """The declarations of a report task (binary, multiclass, multilabel, segmentation), in report order,
    of the kinds given (performance and calibration by default; None: every kind); those of ordered grades
    only when ``ordinal``."""
    return tuple(m for m in METRICS if task in m.tasks and (kind is None or m.kind in kind) and (ordinal or not m.ordinal))


def report_metrics(report, *, kind: tuple[str, ...] | None = (PERFORMANCE, CALIBRATION)) -> tuple[MetricDeclaration, ...]:
    """The declarations a report.json holds: those of its task, and of ordered grades when it says ``ordinal``."""
    return metrics_for(report["task"], kind=kind, ordinal=bool(report.get("ordinal")))


def weighted_metrics_names(*, ordinal: bool = False) -> tuple[str, ...]:
    """The metrics with a weighted form: those the bootstrap and non-inferiority compute (the graded ones only
    for ordered grades)."""
    return tuple(m.name for m in METRICS if m.weighted is not None and (ordinal or not m.ordinal))
