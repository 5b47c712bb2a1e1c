"""Embedding drift: the MMD statistic against scikit-learn's kernel, and its permutation p-value."""

from __future__ import annotations

import numpy as np
from sklearn.metrics.pairwise import rbf_kernel

from components.monitoring.drift import mmd_test


def _mmd_with_sklearn(x: np.ndarray, y: np.ndarray, gamma: float) -> float:
    kxx, kyy, kxy = rbf_kernel(x, x, gamma=gamma), rbf_kernel(y, y, gamma=gamma), rbf_kernel(x, y, gamma=gamma)
    m, n = len(x), len(y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_the_statistic_is_the_unbiased_squared_mmd_of_scikit_learns_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)), rng.normal(0.3, 1.2, size=(45, 8))
    result = mmd_test(x, y, n_resamples=50)
    assert result["n_batch"] == 30 and result["n_reference"] == 45
    expected = _mmd_with_sklearn(x, y, gamma=1 / result["bandwidth"])
    assert abs(result["statistic"] - expected) < 1e-12
    pooled = np.vstack([x, y])
    distances = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
    assert abs(result["bandwidth"] - np.median(distances[np.triu_indices(75, 1)])) < 1e-9


def test_the_p_value_finds_a_shift_and_not_a_resample():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(200, 16))
    same = mmd_test(rng.normal(size=(40, 16)), reference)
    shifted = mmd_test(rng.normal(size=(40, 16)) + np.r_[0.8, np.zeros(15)], reference)
    assert same["p_value"] > 0.05 and shifted["p_value"] < 0.01
    assert shifted["statistic"] > same["statistic"]
    # the p-value is a permutation p-value: no smaller than 1 / (resamples + 1)
    assert shifted["p_value"] >= 1 / 501
