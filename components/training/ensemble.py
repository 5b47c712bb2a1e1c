"""A k-fold study's fold ensemble as one network: each fold's classifier on the input, its own calibration
(temperature) applied, and the folds' probabilities averaged. The served model (one pyfunc) thus gives the
ensemble's calibrated probabilities, the folds inside it.

Each fold normalised its images with its own training split's mean and standard deviation; the ensemble takes
images normalised with the first fold's and maps them to each fold's (both are affine: exact), so one
preprocessing serves them all. The mean of calibrated probabilities is returned as logits whose softmax (or
sigmoid, multi-label) with temperature 1 gives it back. Its features (embedding drift) are every fold's
penultimate features side by side (:class:`FoldFeatures`): the folds' feature spaces differ, so none of them
alone stands for the ensemble and their mean would mix unrelated coordinates. No library builds this network (MONAI's ensemble
helpers average outputs of transforms at inference, not a network a registry can hold).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ENSEMBLE = "ensemble"
EPSILON = 1e-7  # probabilities are kept in [EPSILON, 1 - EPSILON] before their logarithm


class FoldEnsemble(nn.Module):
    """``forward(x (B, 1, H, W))`` -> logits (B, K) of the mean of the members' calibrated probabilities.

    Args:
        members: the folds' classifiers.
        temperatures: each member's fitted temperature.
        statistics: each member's (mean, std) of training intensities; the first is the input's.
        multilabel: a sigmoid per label instead of a softmax over classes.
    """

    def __init__(self, members: Sequence[nn.Module], *, temperatures: Sequence[float],
                 statistics: Sequence[tuple[float, float]], multilabel: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]), persistent=False)
        mean, std = statistics[0]
        # member k wants (raw - m_k) / s_k = x * (s_0 / s_k) + (m_0 - m_k) / s_k for x = (raw - m_0) / s_0
        self.register_buffer("scale", torch.tensor([std / s for _, s in statistics]), persistent=False)
        self.register_buffer("shift", torch.tensor([(mean - m) / s for m, s in statistics]), persistent=False)
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for k, member in enumerate(self.members):
            logits = member(x * self.scale[k] + self.shift[k]).double() / self.temperatures[k]
            prob = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
            total = prob if total is None else total + prob
        mean = (total / len(self.members)).clamp(EPSILON, 1 - EPSILON)
        return (torch.logit(mean) if self.multilabel else torch.log(mean)).float()


class FoldFeatures(nn.Module):
    """``forward(x)`` -> (B, D_0 + ... + D_{k-1}): each fold's encoder (its network before its head) on the
    input mapped to that fold's normalisation, concatenated in fold order: the features the ensemble's heads see.

    Args:
        ensemble: the joined folds, for their input mappings.
        encoders: each member's network without its head, in the members' order.
    """

    def __init__(self, ensemble: FoldEnsemble, encoders: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.register_buffer("scale", ensemble.scale.clone(), persistent=False)
        self.register_buffer("shift", ensemble.shift.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([encoder(x * self.scale[k] + self.shift[k]).reshape(len(x), -1)
                          for k, encoder in enumerate(self.encoders)], dim=1)
