"""The preprocessing a model was trained with, shared by training, evaluation and the pyfunc.

Images are single-channel arrays in the dataset's layout (rows, cols[, slices]),
intensity values after the modality LUT. A classifier's images are resized to
the training size; a segmentation network's keep their size (it runs by
patches) and are padded up to at least one patch. Both are normalised with the
training split's mean and standard deviation. A pretrained backbone's images
instead take the checkpoint's own normalisation: each image is scaled to [0, 1]
(as an 8-bit export would be), repeated to the backbone's channels, and
normalised per channel with the checkpoint's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
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
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RepeatChannel,
    RepeatChanneld,
    Resize,
    Resized,
    ScaleIntensity,
    ScaleIntensityd,
    SpatialPadd,
)
from sklearn.preprocessing import StandardScaler

from components.errors import DataValidationError


@dataclass(frozen=True)
class PreprocessSpec:
    """What every image goes through before the network: size in pixels, intensity mean/std; for a
    pretrained backbone, its channels and per-channel mean/std (``channel_mean`` set)."""

    spatial_size: tuple[int, int]
    mean: float
    std: float
    channels: int = 1
    channel_mean: tuple[float, ...] | None = None
    channel_std: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> PreprocessSpec:
        per_channel = raw.get("channel_mean") is not None
        return cls(spatial_size=tuple(raw["spatial_size"]), mean=float(raw["mean"]), std=float(raw["std"]),
                   channels=int(raw.get("channels", 1)),
                   channel_mean=tuple(map(float, raw["channel_mean"])) if per_channel else None,
                   channel_std=tuple(map(float, raw["channel_std"])) if per_channel else None)


def normalisation(spec: PreprocessSpec, *, keys: str | None) -> list:
    """The intensity transforms of ``spec``: z-score with the data's mean/std, or a backbone's
    [0, 1] scaling, channel repeat and per-channel mean/std (dictionary transforms when ``keys``)."""
    if spec.channel_mean is None:
        return [NormalizeIntensityd(keys=keys, subtrahend=spec.mean, divisor=spec.std) if keys
                else NormalizeIntensity(subtrahend=spec.mean, divisor=spec.std)]
    mean = np.asarray(spec.channel_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.channel_std, dtype=np.float32)[:, None, None]
    if keys:
        return [ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0), RepeatChanneld(keys=keys, repeats=spec.channels),
                NormalizeIntensityd(keys=keys, subtrahend=mean, divisor=std)]
    return [ScaleIntensity(minv=0.0, maxv=1.0), RepeatChannel(repeats=spec.channels),
            NormalizeIntensity(subtrahend=mean, divisor=std)]


def training_transforms(spec: PreprocessSpec, *, augment: bool) -> Compose:
    """Dictionary transforms from a NIfTI path (key ``image``) to a normalised (C, H, W) tensor."""
    steps = [
        LoadImaged(keys="image", reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        Resized(keys="image", spatial_size=spec.spatial_size),
        *normalisation(spec, keys="image"),
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
            *normalisation(spec, keys=None),
            EnsureType(track_meta=False),
        ]
    )


def intensity_stats(paths: Iterable[str | Path]) -> tuple[float, float]:
    """Mean and standard deviation over all voxels of the NIfTI images at ``paths``, read one at a time, so a
    sample of 32 full-size CT volumes needs the memory of one (scikit-learn's incremental StandardScaler
    merges each image's moments into the running ones).

    Raises:
        DataValidationError: an image with NaN or infinite voxels (scikit-learn would skip the NaNs and refuse
            the infinities with a traceback), or no image at all.
    """
    scaler = StandardScaler()
    for path in paths:
        image = nib.load(path).get_fdata(dtype=np.float32)
        bad = image.size - int(np.count_nonzero(np.isfinite(image)))
        if bad:
            raise DataValidationError(f"{path}: {bad} NaN or infinite voxel(s); the validation step refuses such "
                                      "images: validate the dataset (medflow validate) before training on it")
        scaler.partial_fit(image.reshape(-1, 1))
    if not hasattr(scaler, "mean_"):
        raise DataValidationError("no training images to take the intensity mean and standard deviation from")
    return float(scaler.mean_[0]), float(np.sqrt(scaler.var_[0]) or 1.0)


@dataclass(frozen=True)
class SegmentationSpec:
    """A segmentation network's preprocessing: its patch (training crop and sliding window), intensity mean/std."""

    patch_size: tuple[int, ...]
    mean: float
    std: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SegmentationSpec:
        return cls(patch_size=tuple(raw["patch_size"]), mean=float(raw["mean"]), std=float(raw["std"]))


def segmentation_transforms(spec: SegmentationSpec, *, augment: bool, samples: int = 4) -> Compose:
    """From NIfTI paths (keys ``image``, ``label``) to normalised (1, *spatial) tensors.

    Training (``augment``) crops ``samples`` patches per image, half centred on
    foreground (MONAI's RandCropByPosNegLabeld), and flips them; validation keeps
    whole images for sliding-window inference.
    """
    keys = ["image", "label"]
    axes = list(range(len(spec.patch_size)))
    steps = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        NormalizeIntensityd(keys="image", subtrahend=spec.mean, divisor=spec.std),
        EnsureTyped(keys=keys, track_meta=False),
    ]
    if augment:
        steps += [
            SpatialPadd(keys=keys, spatial_size=spec.patch_size),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=spec.patch_size, pos=1, neg=1,
                                   num_samples=samples),
            *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in axes],
        ]
    return Compose(steps)


def segmentation_array_transform(spec: SegmentationSpec) -> Compose:
    """The served model's preprocessing of one raw (H, W[, D]) array (no padding: the window pads)."""
    return Compose([
        EnsureChannelFirst(channel_dim="no_channel"),
        NormalizeIntensity(subtrahend=spec.mean, divisor=spec.std),
        EnsureType(track_meta=False),
    ])
