from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from components.errors import EvaluationError
from components.evaluation.calibration import fit_temperature, softmax


def _overconfident(n=4000, true_t=2.5, seed=0):
    """Logits whose labels were drawn from softmax(logits / true_t)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=4.0, size=(n, 3))
    p = softmax(logits, temperature=true_t)
    y = np.array([rng.choice(3, p=row) for row in p])
    return logits, y


def test_recovers_the_temperature_that_generated_the_labels():
    logits, y = _overconfident()
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)


def test_matches_a_scalar_minimisation_of_the_nll():
    logits, y = _overconfident(n=1000, true_t=0.7, seed=1)

    def nll(t):
        return -log_softmax(logits / t, axis=1)[np.arange(len(y)), y].mean()

    reference = minimize_scalar(nll, bounds=(0.05, 20), method="bounded").x
    assert fit_temperature(logits, y) == pytest.approx(reference, rel=1e-3)


def test_one_class_leaves_the_logits_alone_and_shapes_are_checked():
    assert fit_temperature(np.zeros((5, 2)), np.zeros(5, dtype=int)) == 1.0
    with pytest.raises(EvaluationError, match=r"logits must be \(N, K\) and y_true \(N,\) or \(N, K\), got \(5,\) and \(5,\)"):
        fit_temperature(np.zeros(5), np.zeros(5, dtype=int))
