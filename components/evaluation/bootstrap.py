"""Patient-level bootstrap confidence intervals, vectorised over resamples.

A resample draws patients with replacement; every image of a drawn patient
comes along, so a resample is a (B, N) matrix of case weights (how often each
case was drawn). Each metric is computed for all B resamples at once as a
weighted metric. scikit-learn and torchmetrics score one resample per call,
which is hundreds of times slower here; tests check every weighted metric
against scikit-learn's ``sample_weight`` versions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from components.evaluation.metrics import ECE_BINS

CHUNK = 64
EPS = np.finfo(np.float64).eps


def resample_weights(
    patient_codes: np.ndarray, *, n_resamples: int, rng: np.random.Generator, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """Case weights of patient-level resamples, ``chunk`` rows at a time.

    Args:
        patient_codes: (N,) integer code of each case's patient, 0..P-1.
        n_resamples: total rows B to yield.
        rng: random source.
        chunk: rows per yielded (chunk, N) array, to bound memory.
    """
    n_patients = int(patient_codes.max()) + 1
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        counts = rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=b)
        yield counts[:, patient_codes].astype(np.float64)
        done += b


def weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each weight row: (B,) values, NaN where a class has zero weight.

    Mann-Whitney with ties counted half, from per-score-level weighted class totals.
    """
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], positive[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    w = weights[:, order]
    pos_w = np.add.reduceat(w * pos, starts, axis=1)
    neg_w = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    num = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
    denom = pos_w.sum(axis=1) * neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, num / denom, np.nan)


def weighted_calibration_error(
    confidence: np.ndarray, accuracy: np.ndarray, weights: np.ndarray, *, n_bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """ECE and MCE of each weight row over equal-width bins, binned as torchmetrics does."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins - 1)
    onehot = np.eye(n_bins)[bins]
    count = weights @ onehot
    gap = np.abs(weights @ (onehot * accuracy[:, None]) - weights @ (onehot * confidence[:, None]))
    with np.errstate(invalid="ignore", divide="ignore"):
        ece = gap.sum(axis=1) / count.sum(axis=1)
        mce = np.where(count > 0, gap / np.where(count > 0, count, 1), 0.0).max(axis=1)
    return ece, mce


def weighted_metrics(y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray, *, threshold: float) -> dict:
    """Every contract metric for each weight row: ``{metric: (B,) array}``.

    Args:
        y_true: (N,) integer classes.
        prob: (N,) positive-class probability or (N, K) class probabilities.
        weights: (B, N) non-negative case weights.
        threshold: decision threshold (binary).
    """
    y_true = np.asarray(y_true).astype(int)
    total = weights.sum(axis=1)
    if prob.ndim == 1:
        k = 2
        pred = (prob >= threshold).astype(int)
        auc = weighted_auc(y_true == 1, prob, weights)
        ece, mce = weighted_calibration_error(prob, (y_true == 1).astype(float), weights)
        p_true = np.where(y_true == 1, prob, 1 - prob)
        brier_case = (prob - y_true) ** 2
    else:
        k = prob.shape[1]
        pred = prob.argmax(axis=1)
        auc = np.mean([weighted_auc(y_true == c, prob[:, c], weights) for c in range(k)], axis=0)
        ece, mce = weighted_calibration_error(prob.max(axis=1), (pred == y_true).astype(float), weights)
        p_true = prob[np.arange(len(y_true)), y_true]
        brier_case = np.sum((prob - np.eye(k)[y_true]) ** 2, axis=1)
    nll_case = -np.log(np.clip(p_true, EPS, 1 - EPS))
    tp = np.stack([weights @ ((pred == c) & (y_true == c)) for c in range(k)], axis=1)
    fp = np.stack([weights @ ((pred == c) & (y_true != c)) for c in range(k)], axis=1)
    fn = np.stack([weights @ ((pred != c) & (y_true == c)) for c in range(k)], axis=1)
    tn = total[:, None] - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        spec = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        pick = (lambda a: a[:, 1]) if k == 2 else (lambda a: a.mean(axis=1))
        return {
            "auc": auc,
            "accuracy": tp.sum(axis=1) / total,
            "sensitivity": pick(recall),
            "specificity": spec[:, 1] if k == 2 else spec.mean(axis=1),
            "f1": pick(f1),
            "ece": ece,
            "mce": mce,
            "brier": weights @ brier_case / total,
            "nll": weights @ nll_case / total,
        }


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    patient_ids: np.ndarray,
    *,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile confidence intervals of every metric, resampling patients.

    Returns:
        ``{metric: [low, high]}``; None for a metric undefined in every resample.
    """
    if n_resamples == 0:
        return {}
    codes = np.unique(np.asarray(patient_ids), return_inverse=True)[1]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {}
    for weights in resample_weights(codes, n_resamples=n_resamples, rng=rng):
        for name, values in weighted_metrics(y_true, prob, weights, threshold=threshold).items():
            parts.setdefault(name, []).append(values)
    alpha = (1 - level) / 2 * 100
    out: dict[str, list[float] | None] = {}
    for name, chunks in parts.items():
        values = np.concatenate(chunks)
        values = values[~np.isnan(values)]
        out[name] = [float(np.percentile(values, alpha)), float(np.percentile(values, 100 - alpha))] if len(values) else None
    return out
