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

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import get_track_meta, set_track_meta
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

from components.data.sources import NIFTI_ERRORS
from components.errors import DataValidationError, UnreadableImage

CHANGED_SINCE_INGEST = ("the dataset changed after ingest: restore its version (medflow data checkout) or ingest "
                        "its source again")


def unreadable(path: str | Path, exc: BaseException) -> UnreadableImage:
    """The error for an image of the dataset that cannot be read: its path and the reader's error, one line."""
    said = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {said[-1]}" if said else type(exc).__name__
    return UnreadableImage(f"{path}: cannot be read ({reason}); {CHANGED_SINCE_INGEST}")


def read_nifti(path: str | Path, read: Callable = lambda image: image):
    """``read`` of the NIfTI image at ``path`` (by default the image itself, only its header read yet), or
    :class:`UnreadableImage` naming a file that cannot be read."""
    try:
        return read(nib.load(path))
    except NIFTI_ERRORS as exc:
        raise unreadable(path, exc) from exc


class LoadNamedImaged(LoadImaged):
    """MONAI's LoadImaged (nibabel) for one key, whose file that cannot be read raises :class:`UnreadableImage`
    naming it: MONAI's own error names neither the file (an image cut short: gzip's EOFError) nor the reader's
    problem but in a help text (a corrupt header or a missing file: "cannot find a suitable reader")."""

    def __init__(self, key: str) -> None:
        super().__init__(keys=key, reader="NibabelReader", image_only=True)

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except (*NIFTI_ERRORS, RuntimeError):
            # MONAI tries its other readers too and keeps the last one's error (pydicom's, for a NIfTI file):
            # the file is read again with nibabel alone, only when it failed, for nibabel's own error
            read_nifti(data[self.keys[0]], lambda image: np.asarray(image.dataobj))
            raise  # nibabel reads the file: the error is not the file's


_UNREADABLE_LINE = f"{UnreadableImage.__module__}.{UnreadableImage.__qualname__}: "


@contextlib.contextmanager
def unreadable_images_named() -> Iterator[None]:
    """Raise the :class:`UnreadableImage` that a load transform raised as itself (one line for the CLI), out of
    MONAI's ``RuntimeError("applying transform ...")`` around it, or out of the text of the traceback that a
    DataLoader worker process passes on (torch rebuilds only the outer error's type from that text)."""
    try:
        yield
    except UnreadableImage:
        raise
    except Exception as exc:
        seen, cause = set(), exc
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, UnreadableImage):
                raise UnreadableImage(str(cause)) from exc
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        for line in str(exc).splitlines():
            if line.startswith(_UNREADABLE_LINE):
                raise UnreadableImage(line[len(_UNREADABLE_LINE):]) from exc
        raise


_untracked_lock = threading.Lock()
_untracked = {"inside": 0, "before": True}


@contextlib.contextmanager
def untracked_meta() -> Iterator[None]:
    """MONAI's metadata tracking off while the block runs, in this process.

    MONAI has only the process-wide switch (``monai.data.set_track_meta``), which its fast-training tutorial
    turns off for good; this scopes it. The threads that fill a cache run transforms at once, so the blocks
    inside are counted and the last one out puts back what the first one found.
    """
    with _untracked_lock:
        if _untracked["inside"] == 0:
            _untracked["before"] = get_track_meta()
            set_track_meta(False)
        _untracked["inside"] += 1
    try:
        yield
    finally:
        with _untracked_lock:
            _untracked["inside"] -= 1
            if _untracked["inside"] == 0:
                set_track_meta(_untracked["before"])


class PlainCompose(Compose):
    """MONAI's Compose whose transforms hand each other plain tensors, not MetaTensors.

    Nothing of medflow reads a transform's metadata (the network gets plain tensors; geometry comes from the
    NIfTI header), and tracking it is most of what a random transform costs: a random flip and rotation of a
    64x64 image take 0.44 ms with it and 0.11 ms without (MONAI's fast-training tutorial turns it off for this
    reason). The outputs are the same, bit for bit. It holds in whatever process runs the transforms: the
    DataLoader's workers, a cache's threads, the pyfunc.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        with untracked_meta():
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)


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


def training_transforms(spec: PreprocessSpec, *, augment: bool) -> PlainCompose:
    """Dictionary transforms from a NIfTI path (key ``image``) to a normalised (C, H, W) tensor."""
    steps = [
        LoadNamedImaged("image"),
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        Resized(keys="image", spatial_size=spec.spatial_size),
        *normalisation(spec, keys="image"),
        EnsureTyped(keys="image", track_meta=False),
    ]
    if augment:
        steps += [RandFlipd(keys="image", prob=0.5, spatial_axis=1), RandRotate90d(keys="image", prob=0.5)]
    return PlainCompose(steps)


def array_transform(spec: PreprocessSpec) -> PlainCompose:
    """The same preprocessing for one raw (H, W) array, as the served model applies it."""
    return PlainCompose(
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
        UnreadableImage: an image that cannot be read.
        DataValidationError: an image with NaN or infinite voxels (scikit-learn would skip the NaNs and refuse
            the infinities with a traceback), or no image at all.
    """
    scaler = StandardScaler()
    for path in paths:
        image = read_nifti(path, lambda image: image.get_fdata(dtype=np.float32))
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


def segmentation_transforms(spec: SegmentationSpec, *, augment: bool, samples: int = 4) -> PlainCompose:
    """From NIfTI paths (keys ``image``, ``label``) to normalised (1, *spatial) tensors.

    Training (``augment``) crops ``samples`` patches per image, half centred on
    foreground (MONAI's RandCropByPosNegLabeld), and flips them; validation keeps
    whole images for sliding-window inference.
    """
    keys = ["image", "label"]
    axes = list(range(len(spec.patch_size)))
    steps = [
        *(LoadNamedImaged(key) for key in keys),
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
    return PlainCompose(steps)


def segmentation_array_transform(spec: SegmentationSpec) -> PlainCompose:
    """The served model's preprocessing of one raw (H, W[, D]) array (no padding: the window pads)."""
    return PlainCompose([
        EnsureChannelFirst(channel_dim="no_channel"),
        NormalizeIntensity(subtrahend=spec.mean, divisor=spec.std),
        EnsureType(track_meta=False),
    ])
