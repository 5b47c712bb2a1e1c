"""Losses and class weights of every task: torch's cross-entropy and BCE, MONAI's focal and Dice family.

Classifiers take logits (B, K) against class indices (B,), multi-label classifiers logits (B, L)
against 0/1 (B, L), segmentation networks logits (B, K, *spatial) against label maps (B, 1, *spatial).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss, DiceLoss, FocalLoss

from components.errors import ConfigError


def class_weights(choice: str | list[float], counts: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: none, ``balanced`` (n / (K * count), as scikit-learn's) or given.

    ``counts`` are the training cases of each class (classification: ``np.bincount`` of the labels) or its
    voxels (segmentation), ``num_classes`` long.
    """
    if choice == "none":
        return None
    if choice == "balanced":
        counts = np.asarray(counts, dtype=float)
        if (counts == 0).any():
            missing = [k for k in range(num_classes) if counts[k] == 0]
            raise ConfigError(f"train.class_weights=balanced: class(es) {missing} have no training cases")
        return torch.tensor(counts.sum() / (num_classes * counts), dtype=torch.float32)
    if len(choice) != num_classes:
        raise ConfigError(f"train.class_weights has {len(choice)} values; data.num_classes is {num_classes}")
    return torch.tensor(choice, dtype=torch.float32)


def positive_weights(choice: str | list[float], targets: np.ndarray) -> torch.Tensor | None:
    """Multi-label loss weights: none, ``balanced`` (negatives / positives per label, torch's ``pos_weight``) or given."""
    if choice == "none":
        return None
    if choice == "balanced":
        positives = targets.sum(axis=0)
        if (positives == 0).any() or (positives == len(targets)).any():
            one_sided = [j for j in range(targets.shape[1]) if positives[j] in (0, len(targets))]
            raise ConfigError(f"train.class_weights=balanced: label(s) {one_sided} are never or always present in training")
        return torch.tensor((len(targets) - positives) / positives, dtype=torch.float32)
    if len(choice) != targets.shape[1]:
        raise ConfigError(f"train.class_weights has {len(choice)} values; data.num_classes is {targets.shape[1]}")
    return torch.tensor(choice, dtype=torch.float32)


def build_multilabel_loss(name: str, weights: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Binary cross-entropy (torch, ``pos_weight``) or sigmoid focal loss (MONAI) of logits (B, L) against 0/1 (B, L)."""
    if name == "focal":
        return FocalLoss(use_softmax=False, gamma=2.0, weight=weights)
    if name != "cross_entropy":
        raise ConfigError(f"train.loss {name!r} is a segmentation loss; a classifier takes cross_entropy or focal")
    return torch.nn.BCEWithLogitsLoss(pos_weight=weights)


def build_loss(name: str, weights: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy (torch) or focal loss (MONAI) of logits (B, K) against class indices (B,)."""
    if name == "focal":
        focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=weights)
        return lambda logits, target: focal(logits, target[:, None])
    if name != "cross_entropy":
        raise ConfigError(f"train.loss {name!r} is a segmentation loss; a classifier takes cross_entropy or focal")
    return torch.nn.CrossEntropyLoss(weight=weights)


def build_seg_loss(name: str, weights: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A MONAI or torch loss of logits (B, K, *spatial) against label maps (B, 1, *spatial)."""
    if name == "dice":
        return DiceLoss(to_onehot_y=True, softmax=True, weight=weights)
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weights)
    if name == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, weight=weights)
    if name == "focal":
        return FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=weights)
    ce = torch.nn.CrossEntropyLoss(weight=weights)
    return lambda logits, target: ce(logits, target[:, 0].long())
