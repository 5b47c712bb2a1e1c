"""The forward passes every stage predicts with: batches of a loader, and sliding windows over whole
images. Training's validation calls them here; :mod:`components.inference` loads a model and predicts
through the same two functions, so a network is run one way everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from torch import nn

from components.progress import track
from components.training.preprocess import PreprocessSpec, training_transforms

SW_BATCH = 4
SW_OVERLAP = 0.25
FEATURE_BATCH = 64


def predict_batches(model: torch.nn.Module, loader: DataLoader, device: torch.device, *,
                    progress=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N, K) of every batch of ``loader`` (dicts with ``image``), and its ``label`` (N, ...) when the
    batches carry one (else None). The model is put in eval mode; no gradients.

    Args:
        model: the network, on ``device``.
        loader: batches of ``{"image": (B, C, *spatial)[, "label": ...]}``.
        device: where the network runs.
        progress: wraps the loader (e.g. a progress bar) when given.
    """
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in (progress(loader) if progress else loader):
            logits.append(model(batch["image"].to(device)).float().cpu())
            if "label" in batch:
                labels.append(torch.as_tensor(batch["label"]))
    out = torch.cat(logits).numpy() if logits else np.zeros((0, 0), dtype=np.float32)
    return out, (torch.cat(labels).numpy() if labels else None)


def extract_features(encoder: nn.Module, spec: PreprocessSpec, frame: pd.DataFrame, root: Path,
                     device: torch.device, *, batch_size: int = FEATURE_BATCH, description: str = "Features"
                     ) -> np.ndarray:
    """Features (N, D) of the images of ``frame`` (paths relative to ``root``) through a frozen encoder."""
    records = [{"image": str(root / p)} for p in frame["image"]]
    loader = DataLoader(Dataset(records, training_transforms(spec, augment=False)), batch_size=batch_size)
    encoder.to(device)
    features, _ = predict_batches(encoder, loader, device,
                                  progress=lambda it: track(it, description=description))
    return features


def sliding_window(network: torch.nn.Module, image: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """Logits (B, K, *spatial) of whole images (B, C, *spatial), by overlapping Gaussian-weighted patches (MONAI)."""
    return sliding_window_inference(image, roi_size=patch_size, sw_batch_size=SW_BATCH, predictor=network,
                                    overlap=SW_OVERLAP, mode="gaussian")
