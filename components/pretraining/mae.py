"""Masked autoencoding (He et al., 2022) with MONAI's ``MaskedAutoEncoderViT``: most patches of each image are
hidden from the encoder (``pretrain.mask_ratio``), and a light decoder predicts their pixels from the visible
ones. The loss is the mean squared error over the hidden patches, as in the paper. After pretraining the
decoder is unused: the encoder half is what a classifier starts from (:class:`MAEEncoder`)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from components.training.encoders import MAEEncoder


class MaskedReconstruction(nn.Module):
    """``forward(images (B, C, H, W))`` -> each image's mean squared error over its hidden patches (B,).

    The error is computed inside the forward pass (MONAI's autoencoder returns predicted patches, not the
    targets), so the epoch loop's ``loss(output, labels)`` is its mean. MONAI has the network but no MAE loss.
    """

    def __init__(self, encoder: MAEEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch = tuple(encoder.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        predicted, mask = self.encoder.reconstruct(images)
        # the patches in the order MONAI's patch embedding (a strided convolution, flattened) numbers them
        target = rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch[0], p2=self.patch[1])
        per_patch = ((predicted - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


def reconstruction_loss(errors: torch.Tensor, _labels: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's loss: the mean of its images' hidden-patch errors."""
    return errors.mean()
