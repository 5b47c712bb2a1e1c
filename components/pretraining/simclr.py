"""SimCLR (Chen et al., 2020): two randomly augmented views of each image; an encoder and a projection head
map both, and MONAI's ``ContrastiveLoss`` (NT-Xent) pulls each image's two projections together and pushes
them from the other images' in the batch. After pretraining the projection head is dropped: the encoder is
what a classifier starts from.

The views are grey-level augmentations (MONAI transforms): a random crop of at least ``crop_scale`` of each
side resized back, flips and quarter turns, intensity scale and shift, Gaussian noise and blur; no colour
jitter, which has no meaning on CT or X-ray.
"""

from __future__ import annotations

import torch
from monai.losses import ContrastiveLoss
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CopyItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
)
from torch import nn

from components.config import PretrainConfig
from components.training.preprocess import PreprocessSpec

VIEW = "view"


class TwoViews(nn.Module):
    """Encoder and projection head over the two views of a batch, stacked on the channel axis.

    ``forward((B, 2C, H, W))`` -> projections (2B, P): the first views' rows, then the second views'.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, projection_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        # SimCLR's projection head, a two-layer MLP. lightly's SimCLRProjectionHead is the same; lightly is not a
        # dependency because it imports torchvision, whose wheels do not load beside the CPU build of torch.
        self.projector = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                       nn.Linear(feature_dim, projection_dim))

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        first, second = views.chunk(2, dim=1)
        return self.projector(self.encoder(torch.cat([first, second])).flatten(1))


def contrastive_loss(temperature: float):
    """``loss(projections (2B, P), labels)`` (labels unused): MONAI's NT-Xent between the two halves."""
    loss = ContrastiveLoss(temperature=temperature)

    def compute(projections: torch.Tensor, _labels: torch.Tensor | None = None) -> torch.Tensor:
        first, second = projections.chunk(2)
        return loss(first, second)

    return compute


def view_transforms(spec: PreprocessSpec, cfg: PretrainConfig) -> Compose:
    """Dictionary transforms from a NIfTI path (key ``image``) to two augmented views stacked on the channel
    axis (2C, H, W). Everything before the first random transform is what a cache keeps."""
    side = min(spec.spatial_size)
    crop = max(1, round(cfg.crop_scale * side))
    steps: list = [
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        Resized(keys="image", spatial_size=spec.spatial_size),
        NormalizeIntensityd(keys="image", subtrahend=spec.mean, divisor=spec.std),
        EnsureTyped(keys="image", track_meta=False),
        CopyItemsd(keys="image", times=1, names=VIEW),
    ]
    for key in ("image", VIEW):  # each view draws its own augmentation
        steps += [
            RandSpatialCropd(keys=key, roi_size=(crop, crop), random_size=True),
            Resized(keys=key, spatial_size=spec.spatial_size),
            RandFlipd(keys=key, prob=0.5, spatial_axis=1),
            RandRotate90d(keys=key, prob=0.5),
            RandScaleIntensityd(keys=key, factors=cfg.intensity, prob=0.8),
            RandShiftIntensityd(keys=key, offsets=cfg.intensity, prob=0.8),
            RandGaussianNoised(keys=key, std=cfg.noise_std, prob=0.5),
            RandGaussianSmoothd(keys=key, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.3),
        ]
    steps += [ConcatItemsd(keys=["image", VIEW], name="image", dim=0), DeleteItemsd(keys=VIEW),
              EnsureTyped(keys="image", track_meta=False)]
    return Compose(steps)
