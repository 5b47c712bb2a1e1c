"""The preprocessing a model was trained with, shared by training and the pyfunc.

Images are single-channel 2D arrays in DICOM layout (rows, cols), intensity
values after the modality LUT. They are resized to the training size and
normalised with the training split's mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    EnsureType,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandFlipd,
    RandRotate90d,
    Resize,
    Resized,
)


@dataclass(frozen=True)
class PreprocessSpec:
    """What every image goes through before the network: size in pixels, intensity mean/std."""

    spatial_size: tuple[int, int]
    mean: float
    std: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> PreprocessSpec:
        return cls(spatial_size=tuple(raw["spatial_size"]), mean=float(raw["mean"]), std=float(raw["std"]))


def training_transforms(spec: PreprocessSpec, *, augment: bool) -> Compose:
    """Dictionary transforms from a NIfTI path (key ``image``) to a normalised (1, H, W) tensor."""
    steps = [
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        Resized(keys="image", spatial_size=spec.spatial_size),
        NormalizeIntensityd(keys="image", subtrahend=spec.mean, divisor=spec.std),
        EnsureTyped(keys="image", track_meta=False),
    ]
    if augment:
        steps += [RandFlipd(keys="image", prob=0.5, spatial_axis=1), RandRotate90d(keys="image", prob=0.5)]
    return Compose(steps)


def array_transform(spec: PreprocessSpec) -> Compose:
    """The same preprocessing for one raw (H, W) array, as the served model applies it."""
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            Resize(spatial_size=spec.spatial_size),
            NormalizeIntensity(subtrahend=spec.mean, divisor=spec.std),
            EnsureType(track_meta=False),
        ]
    )


def intensity_stats(images: list[np.ndarray]) -> tuple[float, float]:
    """Mean and standard deviation over all pixels of ``images``."""
    flat = np.concatenate([np.asarray(i, dtype=np.float64).ravel() for i in images])
    return float(flat.mean()), float(flat.std() or 1.0)
