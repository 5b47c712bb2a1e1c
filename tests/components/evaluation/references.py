"""Independent reference implementations, written from the definitions, for the oracle tests."""

from __future__ import annotations

import numpy as np


def ece_reference(confidence, accuracy, weights=None, n_bins=15):
    """Expected and maximum calibration error, straight from the definition (loops over bins).

    Bins are [lo, hi) as torchmetrics makes them, which gives a confidence of exactly 1 a bin of its own.
    """
    weights = np.ones(len(confidence)) if weights is None else np.asarray(weights, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece, mce, total = 0.0, 0.0, weights.sum()
    for i in range(n_bins + 1):
        lo, hi = edges[i], edges[i + 1] if i < n_bins else np.inf
        inside = (confidence >= lo) & (confidence < hi)
        w = weights[inside]
        if w.sum() == 0:
            continue
        gap = abs(np.average(accuracy[inside], weights=w) - np.average(confidence[inside], weights=w))
        ece += w.sum() / total * gap
        mce = max(mce, gap)
    return ece, mce


def synthetic_predictions(n: int, *, seed: int = 0, k: int = 2, decimals: int | None = 3):
    """Labels, probabilities and three group attributes with built-in group differences (binary
    probabilities rounded to ``decimals``, as scores of few distinct values; None: every score distinct)."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["F", "M"], n)
    site = rng.choice(["a", "b", "c"], n)
    race = rng.choice(["w", "x", "y", "z"], n)
    y = rng.integers(0, k, n)
    strength = np.where(sex == "F", 0.6, 1.8)  # the model is worse for F
    if k == 2:
        logit = strength * (2 * y - 1) + rng.normal(size=n)
        prob = 1 / (1 + np.exp(-logit))
        if decimals is not None:
            prob = np.round(prob, decimals)  # rounding makes ties, as real scores have
        return y, prob, {"sex": sex, "site": site, "race": race}
    logits = rng.normal(size=(n, k)) + strength[:, None] * np.eye(k)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, prob, {"sex": sex, "site": site, "race": race}


def prediction_tables(n: int, *, k: int = 2, seed: int = 0):
    """A predictions table of the evaluation contract and its manifest (two images per patient)."""
    import pandas as pd

    y, prob, groups = synthetic_predictions(n, seed=seed, k=k)
    ids = [f"C{i:05d}" for i in range(n)]
    manifest = pd.DataFrame({"case_id": ids, "patient_id": [f"P{i // 2}" for i in range(n)], **groups})
    predictions = pd.DataFrame({"case_id": ids, "y_true": y})
    if k == 2:
        predictions["prob"] = prob
    else:
        for c in range(k):
            predictions[f"prob_{c}"] = prob[:, c]
    return predictions, manifest
