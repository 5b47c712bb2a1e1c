"""The logged model: an MLflow pyfunc that rebuilds the MONAI network from its
description and a state_dict (no torch.export, no pickled code), applies the
training preprocessing and the fitted temperature, and returns calibrated
probabilities for raw image arrays: per class for a classifier (N, K), per
class and voxel for a segmentation network (N, K, *spatial).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import torch

from components.training.models import build_classifier, build_segmenter
from components.training.preprocess import (
    PreprocessSpec, SegmentationSpec, array_transform, segmentation_array_transform,
)


def load_checkpoint(folder: Path) -> tuple[torch.nn.Module, PreprocessSpec | SegmentationSpec, dict]:
    """Network (eval mode, CPU), preprocessing and description from ``model.pt`` + ``model.json``."""
    description = json.loads((folder / "model.json").read_text())
    common = {"spatial_dims": description["spatial_dims"], "in_channels": description["in_channels"],
              "num_classes": description["num_classes"], "kwargs": description["network_kwargs"]}
    if description.get("task") == "segmentation":
        spec = SegmentationSpec.from_dict(description["preprocess"])
        model = build_segmenter(description["network"], patch_size=spec.patch_size, **common)
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        model.eval()
        return model, spec, description
    model = build_classifier(description["network"], **common)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, PreprocessSpec.from_dict(description["preprocess"]), description


def predict_arrays(
    model: torch.nn.Module, spec: PreprocessSpec, images: np.ndarray, *, temperature: float = 1.0, batch_size: int = 64,
    multilabel: bool = False,
) -> np.ndarray:
    """Class probabilities (N, K) for raw images (N, H, W) or one image (H, W); for a multi-label model
    each label's own probability (sigmoid), so rows need not sum to 1."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, H, W) or (H, W), got {images.shape}")
    transform = array_transform(spec)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(img) for img in images[start:start + batch_size]])
            logits = model(batch).double() / temperature
            out.append(torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1))
    return torch.cat(out).numpy().astype(np.float32)


def segment_arrays(
    model: torch.nn.Module, spec: SegmentationSpec, images: np.ndarray, *, temperature: float = 1.0
) -> np.ndarray:
    """Probabilities (N, K, *spatial) for raw images (N, *spatial) or one image (*spatial), by sliding window."""
    from components.training.segmentation import infer  # noqa: PLC0415

    dims = len(spec.patch_size)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == dims:
        images = images[None]
    if images.ndim != dims + 1:
        raise ValueError(f"expected {dims}D images of shape (N, *spatial) or (*spatial), got {images.shape}")
    transform = segmentation_array_transform(spec)
    with torch.no_grad():
        out = [torch.softmax(infer(model, transform(img)[None], spec.patch_size).double() / temperature, dim=1)
               for img in images]
    return torch.cat(out).numpy().astype(np.float32)


def predict_images(model_uri: str, paths: list[Path]) -> np.ndarray:
    """Probabilities (N, K) of a logged model for NIfTI images, read as raw arrays."""
    model = mlflow.pyfunc.load_model(model_uri)
    images = [nib.load(p).get_fdata(dtype=np.float32) for p in paths]
    shapes = {i.shape for i in images}
    if len(shapes) == 1:
        return np.asarray(model.predict(np.stack(images)))
    return np.concatenate([np.asarray(model.predict(i[None])) for i in images])


class MedflowModel(mlflow.pyfunc.PythonModel):
    """pyfunc over the ``checkpoint`` artifact folder (``model.pt`` + ``model.json``), either task."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        folder = Path(context.artifacts["checkpoint"])
        self.model, self.spec, description = load_checkpoint(folder)
        self.temperature = float(description.get("temperature", 1.0))
        self.multilabel = description.get("task") == "multilabel"

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # noqa: ARG002 (pyfunc signature)
        """Calibrated probabilities: (N, K) for 2D images (N, H, W) of a classifier (per label for a multi-label
        one); (N, K, *spatial) for images (N, *spatial) of a segmentation network."""
        if isinstance(self.spec, SegmentationSpec):
            return segment_arrays(self.model, self.spec, np.asarray(model_input), temperature=self.temperature)
        return predict_arrays(self.model, self.spec, np.asarray(model_input), temperature=self.temperature,
                              multilabel=self.multilabel)
