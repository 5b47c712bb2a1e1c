"""Predict with a loaded model: a manifest's cases (paths relative to its folder) or raw arrays, in
batches, for classifiers and segmentation networks; or a registered model's pyfunc on image files.

Every forward pass goes through :mod:`components.training.forward` (the batch loop and the sliding
window training's validation uses); preprocessing is the one the model was trained with.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader

from components.data.sources import NIFTI_ERRORS
from components.errors import EvaluationError
from components.evaluation.segmentation import BAD_VOLUME
from components.progress import track
from components.training.datasets import check_workers
from components.training.forward import CPU, inference_loader, predict_batches, sliding_window
from components.training.loop import select_device
from components.training.preprocess import (
    PreprocessSpec, SegmentationSpec, array_transform, segmentation_array_transform, training_transforms,
)

BATCH_SIZE = 64


def evaluation_device(model: torch.nn.Module, config) -> torch.device:
    """Where an evaluation predicts: the device training takes (``train.device``: a GPU when there is one, under
    ``auto``), the model moved there. Its ``train.num_workers`` processes prepare the images, as in training.

    Raises:
        ConfigError: ``train.device`` is ``cuda`` without a GPU, or more workers than cores.
    """
    device = select_device(config.train.device)
    check_workers(config.train.num_workers)
    model.to(device)
    return device


def predict_frame(model: torch.nn.Module, spec: PreprocessSpec, frame: pd.DataFrame, root: Path, *,
                  batch_size: int = BATCH_SIZE, device: torch.device = CPU, num_workers: int = 0,
                  description: str = "Predicting") -> np.ndarray:
    """Logits (N, K) of a classifier (on ``device``) for the images of ``frame`` (``image`` paths relative to
    ``root``), read and preprocessed by ``num_workers`` processes
    (:func:`components.training.forward.inference_loader`)."""
    records = [{"image": str(root / p)} for p in frame["image"]]
    loader = inference_loader(records, training_transforms(spec, augment=False), batch_size=batch_size,
                              num_workers=num_workers, device=device)
    logits, _ = predict_batches(model, loader, device,
                                progress=lambda it: track(it, description=description))
    return logits if len(logits) else np.zeros((0, 2), dtype=np.float32)


MIN_SIDE = 16  # the smallest image side medflow trains at (data.image_size): below it there is nothing to see


def check_images(images: np.ndarray, *, trained: tuple[int, ...]) -> None:
    """Refuse input a model cannot answer: values that are not finite (NaN, infinity), or a side smaller than
    ``MIN_SIDE`` pixels (or the training input's own side, when smaller), which resizing would only blur
    into a confident guess.

    Raises:
        EvaluationError: naming the image and what is wrong with it.
    """
    finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise EvaluationError(f"image {int(bad[0])} (of {len(images)}) holds values that are not finite (NaN or "
                              f"infinity){f'; {len(bad)} images do' if len(bad) > 1 else ''}: nothing was predicted")
    least = min(MIN_SIDE, *trained)
    if min(images.shape[1:]) < least:
        raise EvaluationError(f"images of shape {tuple(images.shape[1:])} are smaller than the model can see (each "
                              f"side at least {least} pixels; it was trained on {tuple(trained)}): nothing was predicted")


def forward_arrays(model: torch.nn.Module, spec: PreprocessSpec, images: np.ndarray, *,
                   batch_size: int = BATCH_SIZE, device: torch.device = CPU) -> np.ndarray:
    """The network's outputs (N, ...) for raw images (N, H, W) or one image (H, W), preprocessed as in training,
    on ``device`` (the model's); the outputs in host memory.

    Raises:
        EvaluationError: the array is not (N, H, W) or (H, W).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise EvaluationError(f"expected images of shape (N, H, W) or (H, W), got {images.shape}")
    check_images(images, trained=tuple(spec.spatial_size))
    transform = array_transform(spec)
    loader = DataLoader([{"image": transform(img)} for img in images], batch_size=batch_size)
    outputs, _ = predict_batches(model, loader, device)
    return outputs


def predict_arrays(
    model: torch.nn.Module, spec: PreprocessSpec, images: np.ndarray, *, temperature: float = 1.0,
    batch_size: int = BATCH_SIZE, multilabel: bool = False, device: torch.device = CPU,
) -> np.ndarray:
    """Class probabilities (N, K) for raw images (N, H, W) or one image (H, W); for a multi-label model
    each label's own probability (sigmoid), so rows need not sum to 1.

    Raises:
        EvaluationError: the array is not (N, H, W) or (H, W).
    """
    logits = forward_arrays(model, spec, images, batch_size=batch_size, device=device)
    scaled = torch.as_tensor(logits).double() / temperature
    return (torch.sigmoid(scaled) if multilabel else torch.softmax(scaled, dim=1)).numpy().astype(np.float32)


def embed_arrays(model: torch.nn.Module, spec: PreprocessSpec, images: np.ndarray, *,
                 batch_size: int = BATCH_SIZE, device: torch.device = CPU) -> np.ndarray:
    """An encoder's features (N, D) for raw images (N, H, W) or one image (H, W).

    Raises:
        EvaluationError: the array is not (N, H, W) or (H, W).
    """
    features = forward_arrays(model, spec, images, batch_size=batch_size, device=device)
    return features.reshape(len(features), -1).astype(np.float32)


def segment_tensor(model: torch.nn.Module, spec: SegmentationSpec, image: np.ndarray, *,
                   device: torch.device = CPU) -> np.ndarray:
    """Logits (K, *spatial), float32 as the network gives them, of one raw image (*spatial), preprocessed as in
    training, by sliding window on ``device`` (the model's; the image and its logits stay in host memory). (A
    float64 copy would add nothing to their precision, and on a full-size CT it is 1.3 GB.)"""
    model.eval()
    with torch.no_grad():
        tensor = segmentation_array_transform(spec)(np.asarray(image, dtype=np.float32))[None]
        return sliding_window(model, tensor, spec.patch_size, device=device)[0].numpy()


def segment_arrays(
    model: torch.nn.Module, spec: SegmentationSpec, images: np.ndarray, *, temperature: float = 1.0,
    device: torch.device = CPU,
) -> np.ndarray:
    """Probabilities (N, K, *spatial) for raw images (N, *spatial) or one image (*spatial), by sliding window on
    ``device`` (the model's).

    Raises:
        EvaluationError: the array has the wrong number of dimensions for the network.
    """
    dims = len(spec.patch_size)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == dims:
        images = images[None]
    if images.ndim != dims + 1:
        raise EvaluationError(f"expected {dims}D images of shape (N, *spatial) or (*spatial), got {images.shape}")
    check_images(images, trained=tuple(spec.patch_size))
    return np.stack([softmax(segment_tensor(model, spec, img, device=device), temperature) for img in images])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities ``softmax(logits / T)`` over the first (class) axis, float32 as the logits: a segmentation's
    calibrated probabilities, the same in the registered model and in the evaluation's probability maps."""
    return torch.softmax(torch.as_tensor(logits) / temperature, dim=0).numpy()


def read_image(path: Path, *, case: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (float32, scaled) and affine of a NIfTI image file.

    Raises:
        EvaluationError: naming the file (and ``case``, when given) when it is not NIfTI or its voxels are cut
            short or corrupt.
    """
    try:
        image = nib.load(path)
        return image.get_fdata(dtype=np.float32), image.affine
    except NIFTI_ERRORS as exc:
        problem = f"cannot be read ({exc})"
        raise EvaluationError(f"{path} {problem}" if case is None else
                              BAD_VOLUME.format(case=case, what="image", path=path, problem=problem)) from exc


def predict_images(model_uri: str, paths: list[Path]) -> np.ndarray:
    """Probabilities (N, K) of a registered model (its pyfunc) for NIfTI images, read as raw arrays."""
    model = mlflow.pyfunc.load_model(model_uri)
    images = [read_image(p)[0] for p in paths]
    shapes = {i.shape for i in images}
    if len(shapes) == 1:
        return np.asarray(model.predict(np.stack(images)))
    return np.concatenate([np.asarray(model.predict(i[None])) for i in images])
