"""Temperature scaling (Guo et al., 2017) fitted on the validation split.

Neither MONAI, torchmetrics nor scikit-learn fits a temperature for a network's
logits (scikit-learn calibrates a fitted estimator, not raw logits), so the
one-parameter fit is written here: minimise the NLL of ``softmax(logits / T)``
over ``log T`` with L-BFGS.
"""

from __future__ import annotations

import numpy as np
import torch

from components.errors import EvaluationError

MIN_T, MAX_T = 0.05, 20.0


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, *, max_iter: int = 100) -> float:
    """The temperature T > 0 that minimises the NLL of ``softmax(logits / T)``, or for multi-label
    targets (N, L) of 0/1 the binary NLL of ``sigmoid(logits / T)`` (one T shared by every label).

    Args:
        logits: (N, K) network outputs before softmax (or sigmoid).
        y_true: (N,) integer classes, or (N, L) 0/1 labels.
        max_iter: L-BFGS iterations.

    Returns:
        T, clipped to [0.05, 20]; 1.0 when there are fewer than two classes in ``y_true``.
    """
    if logits.ndim != 2 or len(logits) != len(y_true) or (np.ndim(y_true) == 2 and np.shape(y_true) != logits.shape):
        raise EvaluationError(f"logits must be (N, K) and y_true (N,) or (N, K), got {logits.shape} and {np.shape(y_true)}")
    if len(np.unique(y_true)) < 2:
        return 1.0
    z = torch.tensor(logits, dtype=torch.float64)
    multilabel = np.ndim(y_true) == 2
    y = torch.tensor(y_true, dtype=torch.float64 if multilabel else torch.long)
    nll = torch.nn.functional.binary_cross_entropy_with_logits if multilabel else torch.nn.functional.cross_entropy
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), MIN_T, MAX_T))


def softmax(logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (N, K) of ``logits / temperature``."""
    return torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=1).numpy()


def sigmoid(logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
    """Independent label probabilities (N, L) of ``logits / temperature`` (multi-label)."""
    return torch.sigmoid(torch.tensor(logits, dtype=torch.float64) / temperature).numpy()
