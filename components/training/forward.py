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
from monai.utils import convert_to_tensor
from torch import nn

from components.progress import track
from components.training.datasets import start_worker, worker_context
from components.training.heap import HeapTrimmer, kept_heap, release_free_memory
from components.training.models import memory_format
from components.training.preprocess import PreprocessSpec, training_transforms, unreadable_images_named

SW_BATCH = 4
SW_OVERLAP = 0.25
FEATURE_BATCH = 64
CPU = torch.device("cpu")


def inference_loader(records: list[dict], transform, *, batch_size: int, num_workers: int = 0,
                     device: torch.device = CPU) -> DataLoader:
    """Batches of ``records`` in order, for a forward pass: prepared by ``num_workers`` worker processes (forked
    on Linux, as training's are: :func:`components.training.datasets.worker_context`) while the network runs, in
    pinned memory on CUDA. Without augmentation the batches are the same whatever the workers."""
    return DataLoader(Dataset(records, transform), batch_size=batch_size, num_workers=num_workers,
                      pin_memory=device.type == "cuda", multiprocessing_context=worker_context(num_workers),
                      worker_init_fn=start_worker)


def network_input(images: torch.Tensor, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
    """A batch of images as every network here gets it: a plain tensor on ``device``.

    MONAI's random transforms return MetaTensors, and a MetaTensor sends every operation of the network, forward
    and backward, through its Python ``__torch_function__``. On a GPU that host work is the bound: an H200
    training DenseNet121 on them was 7-21 % busy (BENCHMARKS.md); on 2 CPU cores it cost DenseNet121 a quarter
    of a step at 64x64. The metadata (affine, file name) is not used past the transforms. No copy is made.
    """
    return convert_to_tensor(images, track_meta=False).to(device, non_blocking=non_blocking)


@unreadable_images_named()
def predict_batches(model: torch.nn.Module, loader: DataLoader, device: torch.device, *,
                    progress=None, trim_above: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits (N, K) of every batch of ``loader`` (dicts with ``image``), and its ``label`` (N, ...) when the
    batches carry one (else None). The model is put in eval mode; no gradients; the heap's free pages go back to
    the system after each batch (:func:`~components.training.heap.release_free_memory`), so the peak does not grow
    with the batches.

    Args:
        model: the network, on ``device``.
        loader: batches of ``{"image": (B, C, *spatial)[, "label": ...]}``.
        device: where the network runs.
        progress: wraps the loader (e.g. a progress bar) when given.
        trim_above: trim only once the process grew by more than this many bytes since the loop began (with as
            much free in the heap), and again once it grew by as much (:class:`~components.training.heap.
            HeapTrimmer`; 0: after every batch). Training's validation passes ``heap.VALIDATION_FREE_HEAP``: the
            training steps' heap, with their gradients, already holds a batch's activations, and pages trimmed
            after every batch were faulted back in by the next step (about 5 % of an epoch of the demo's network
            at 128x128 on 2 cores); a large validation split after a long epoch still fragments the heap past that.
    """
    model.eval()
    logits, labels = [], []
    trim = HeapTrimmer(trim_above) if trim_above else release_free_memory
    # the kept heap's settings: the batches' blocks on glibc's heap rather than mapped for each, so a batch's trim
    # hands back free pages without every block faulting in again (a DINOv2-small extraction of 480 images of
    # 112x112, each way in a fresh process: 0.23-0.32 million minor faults a pass against 0.9-1.2 million)
    with kept_heap(), torch.no_grad():
        for batch in (progress(loader) if progress else loader):
            images = network_input(batch["image"], device, non_blocking=device.type == "cuda")
            logits.append(model(images).float().cpu())
            if "label" in batch:
                labels.append(torch.as_tensor(batch["label"]))
            del batch, images
            trim()  # every batch: trimming every 8th only halved the growth
    out = torch.cat(logits).numpy() if logits else np.zeros((0, 0), dtype=np.float32)
    return out, (torch.cat(labels).numpy() if labels else None)


def extract_features(encoder: nn.Module, spec: PreprocessSpec, frame: pd.DataFrame, root: Path,
                     device: torch.device, *, batch_size: int = FEATURE_BATCH, num_workers: int = 0,
                     description: str = "Features") -> np.ndarray:
    """Features (N, D) of the images of ``frame`` (paths relative to ``root``) through a frozen encoder, which
    is moved to ``device`` in the layout ``train.memory_format: auto`` picks for it (channels_last for a CNN);
    ``num_workers`` processes read and preprocess the images (:func:`inference_loader`)."""
    records = [{"image": str(root / p)} for p in frame["image"]]
    loader = inference_loader(records, training_transforms(spec, augment=False), batch_size=batch_size,
                              num_workers=num_workers, device=device)
    encoder.to(device=device, memory_format=memory_format("auto", encoder))
    features, _ = predict_batches(encoder, loader, device,
                                  progress=lambda it: track(it, description=description))
    return features


def sliding_window(network: torch.nn.Module, image: torch.Tensor, patch_size: tuple[int, ...], *,
                   device: torch.device | None = None) -> torch.Tensor:
    """Logits (B, K, *spatial) of whole images (B, C, *spatial), by overlapping Gaussian-weighted patches (MONAI).

    With ``device`` the patches go there for the network and are stitched where ``image`` is: a full-size CT
    stays in host memory, and the GPU holds only ``SW_BATCH`` patches and their outputs at a time."""
    return sliding_window_inference(image, roi_size=patch_size, sw_batch_size=SW_BATCH, predictor=network,
                                    overlap=SW_OVERLAP, mode="gaussian", sw_device=device,
                                    device=image.device if device is not None else None)
