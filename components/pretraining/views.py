"""The augmented views self-supervised methods train on: grey-level augmentations (MONAI transforms), a
random crop of at least ``crop_scale`` of each side resized back, flips and quarter turns, intensity scale and
shift, Gaussian noise and blur; no colour jitter, which has no meaning on CT or X-ray."""

from __future__ import annotations

from monai.transforms import (
    ConcatItemsd,
    CopyItemsd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resized,
)

from components.config import PretrainConfig
from components.training.preprocess import LoadNamedImaged, PlainCompose, PreprocessSpec, normalisation

VIEW = "view"


def _augment(key: str, spec: PreprocessSpec, cfg: PretrainConfig) -> list:
    crop = max(1, round(cfg.crop_scale * min(spec.spatial_size)))
    return [
        RandSpatialCropd(keys=key, roi_size=(crop, crop), random_size=True),
        Resized(keys=key, spatial_size=spec.spatial_size),
        RandFlipd(keys=key, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=key, prob=0.5),
        RandScaleIntensityd(keys=key, factors=cfg.intensity, prob=0.8),
        RandShiftIntensityd(keys=key, offsets=cfg.intensity, prob=0.8),
        RandGaussianNoised(keys=key, std=cfg.noise_std, prob=0.5),
        RandGaussianSmoothd(keys=key, sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.3),
    ]


def view_transforms(spec: PreprocessSpec, cfg: PretrainConfig, *, views: int = 2) -> PlainCompose:
    """Dictionary transforms from a NIfTI path (key ``image``) to ``views`` augmented views of the image
    stacked on the channel axis (views * C, H, W), each with its own random draw. Everything before the
    first random transform is what a cache keeps."""
    steps: list = [
        LoadNamedImaged("image"),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        Resized(keys="image", spatial_size=spec.spatial_size),
        *normalisation(spec, keys="image"),  # the data's mean and std, or a checkpoint's channels and statistics
        EnsureTyped(keys="image", track_meta=False),
    ]
    if views == 1:
        return PlainCompose([*steps, *_augment("image", spec, cfg), EnsureTyped(keys="image", track_meta=False)])
    names = [f"{VIEW}{k}" for k in range(1, views)]
    steps.append(CopyItemsd(keys="image", times=len(names), names=names))
    for key in ("image", *names):  # each view draws its own augmentation
        steps += _augment(key, spec, cfg)
    return PlainCompose([*steps, ConcatItemsd(keys=["image", *names], name="image", dim=0), DeleteItemsd(keys=names),
                    EnsureTyped(keys="image", track_meta=False)])
