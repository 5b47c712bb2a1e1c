"""The logged model: an MLflow pyfunc that rebuilds the MONAI network from its
description and a state_dict (no torch.export, no pickled code), applies the
training preprocessing and the fitted temperature, and returns class
probabilities for raw image arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import torch

from components.training.models import build_classifier
from components.training.preprocess import PreprocessSpec, array_transform


def load_checkpoint(folder: Path) -> tuple[torch.nn.Module, PreprocessSpec, dict]:
    """Network (eval mode, CPU), preprocessing and description from ``model.pt`` + ``model.json``."""
    description = json.loads((folder / "model.json").read_text())
    model = build_classifier(
        description["network"],
        spatial_dims=description["spatial_dims"],
        in_channels=description["in_channels"],
        num_classes=description["num_classes"],
        kwargs=description["network_kwargs"],
    )
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    model.eval()
    return model, PreprocessSpec.from_dict(description["preprocess"]), description


def predict_arrays(
    model: torch.nn.Module, spec: PreprocessSpec, images: np.ndarray, *, temperature: float = 1.0, batch_size: int = 64
) -> np.ndarray:
    """Class probabilities (N, K) for raw images (N, H, W) or one image (H, W)."""
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
            out.append(torch.softmax(model(batch).double() / temperature, dim=1))
    return torch.cat(out).numpy().astype(np.float32)


def predict_images(model_uri: str, paths: list[Path]) -> np.ndarray:
    """Probabilities (N, K) of a logged model for NIfTI images, read as raw arrays."""
    model = mlflow.pyfunc.load_model(model_uri)
    images = [nib.load(p).get_fdata(dtype=np.float32) for p in paths]
    shapes = {i.shape for i in images}
    if len(shapes) == 1:
        return np.asarray(model.predict(np.stack(images)))
    return np.concatenate([np.asarray(model.predict(i[None])) for i in images])


class MedflowClassifier(mlflow.pyfunc.PythonModel):
    """pyfunc over the ``checkpoint`` artifact folder (``model.pt`` + ``model.json``)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        folder = Path(context.artifacts["checkpoint"])
        self.model, self.spec, description = load_checkpoint(folder)
        self.temperature = float(description.get("temperature", 1.0))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # noqa: ARG002 (pyfunc signature)
        """Calibrated class probabilities (N, K) for images (N, H, W)."""
        return predict_arrays(self.model, self.spec, np.asarray(model_input), temperature=self.temperature)
