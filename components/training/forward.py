"""The forward passes every stage predicts with: batches of a loader, and sliding windows over whole
images. Training's validation calls them here; :mod:`components.inference` loads a model and predicts
through the same two functions, so a network is run one way everywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.utils import convert_to_tensor
from torch import nn

from components.progress import track
from components.training.datasets import start_worker, worker_context
from components.training.heap import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MMAP_THRESHOLD_MAX, TRIM_THRESHOLD_MAX
from components.training.heap import libc_function as _libc_function
from components.training.models import memory_format
from components.training.preprocess import PreprocessSpec, training_transforms, unreadable_images_named

SW_BATCH = 4
SW_OVERLAP = 0.25


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later), every field in bytes or chunks."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2`` returning its struct, or None where the C library has none."""
    function = _libc_function("mallinfo2")
    if function is not None:
        function.restype = _MallInfo2
    return function


MALLOC_TRIM = _libc_function("malloc_trim")
MALLINFO2 = _mallinfo2()
MALLOPT = _libc_function("mallopt")
# training's validation hands the heap back once it has grown the process by this much (HeapTrimmer): 20,369
# validation images of 256x256 read after an epoch of 55,000 left 4.5 GB free in the heap (the step's peak 5.9 GB
# against 1.6 trimmed)
VALIDATION_FREE_HEAP = 256 * 2**20


def free_heap_bytes() -> int | None:
    """Bytes glibc's heaps hold free (``mallinfo2``'s ``fordblks``, every arena), None where it cannot say."""
    return MALLINFO2().fordblks if MALLINFO2 is not None else None


def release_free_memory(*, above: int = 0) -> None:
    """Hand the C heap's free pages back to the system; with ``above``, only once the heaps hold more than that
    many bytes free (every time where glibc cannot say how much). A batch's activations are freed into glibc's
    heaps (below its mmap threshold, which rises to 32 MB as large blocks are freed), and the next batches' blocks
    land among them: without this an evaluation of 4,024 images of 256x256 peaked 120 MiB above one of 1,006
    (medians of 3 runs, each varying by 100 MiB or more); trimmed, they peak at 338 and 352 MiB, for 5 % more
    time (``benchmarks/evaluation_memory.py``, 2026-12-05). Torch and numpy allocate with malloc and offer no way
    to trim its heaps, hence ctypes. A loop that trims past a limit uses :class:`HeapTrimmer`."""
    if MALLOC_TRIM is None:
        return
    free = free_heap_bytes() if above else None
    if free is None or free > above:
        MALLOC_TRIM(0)


@contextlib.contextmanager
def kept_heap():
    """While it is open, glibc keeps the pages a training step frees for the next step: blocks up to 32 MiB come
    from its heaps, and it hands none of the heaps' free pages back by itself. When it closes, the heap goes back
    to the system (``malloc_trim``) and glibc trims past 64 MiB free again.

    With glibc's defaults each step's activations and gradients land partly in blocks mapped and unmapped for
    them and partly at the top of a heap that glibc trims as they are freed, so every step faults its working
    set in again: 10 epochs of the demo's network on 200-odd images of 128x128, each in a fresh process, took
    0.85-1.07 million minor faults and 9.7-9.8 s, kept 80-84 thousand and 8.2-9.4 s (BENCHMARKS.md, "Training
    step").
    Validation's :class:`HeapTrimmer` and evaluation's trims call ``malloc_trim`` themselves, which these settings
    do not change. glibc has no way back to its thresholds' rule once they are set; the values it closes with are
    the ones that rule rises to. Torch offers no CPU allocator of its own to tune (jemalloc and tcmalloc are
    loaded with ``LD_PRELOAD``, before the process starts), hence ctypes.
    """
    if MALLOPT is None or MALLOC_TRIM is None:
        yield
        return
    MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    MALLOPT(M_TRIM_THRESHOLD, -1)  # -1: never trim by itself (mallopt(3))
    try:
        yield
    finally:
        MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)
        MALLOC_TRIM(0)


class HeapTrimmer:
    """:func:`release_free_memory` past ``above`` for one loop of batches, called after each: it trims once the
    process has grown by more than ``above`` since the loop began (and glibc's heaps hold more than ``above``
    free), and again only once it has grown by as much since the last trim.

    The free pages a validation starts with are the training steps' working set (their activations and
    gradients), which the next epoch takes again: trimming them at the first batch, as a limit on the free count
    alone did, handed back 640-730 MiB after each epoch of SimCLR pretraining at 64x64 (80-110 ms a trim), and
    the next epoch faulted them back in (4 epochs: 32.6 and 31.1 s untrimmed against 35.0 and 35.6, 0.3 against
    0.9-1.2 million minor faults). What a validation must not do is grow the process: 20,369 validation images of
    256x256 after an epoch of 55,000 left 4.5 GB free in the heap (:data:`VALIDATION_FREE_HEAP`).

    glibc counts a trimmed chunk as free still (``mallinfo2``'s ``fordblks`` is the same before and after
    ``malloc_trim``), so the free count alone would trim every batch once past the limit (17-41 ms a batch after an
    epoch of 1,118 images of 256x256, 527 MiB counted free) and fault the pages back in as the next batch ran. The
    process's resident size (psutil) says whether the loop has grown.
    """

    def __init__(self, above: int) -> None:
        self.above = above
        # the process's resident bytes when the loop began or after the last trim (or since, the least)
        self.resident = resident_bytes()

    def __call__(self) -> None:
        if MALLOC_TRIM is None:
            return
        free = free_heap_bytes()
        if free is not None and free <= self.above:
            return
        resident = resident_bytes()
        if resident - self.resident <= self.above:
            self.resident = min(self.resident, resident)
            return
        MALLOC_TRIM(0)
        self.resident = resident_bytes()


def resident_bytes() -> int:
    """This process's resident memory in bytes."""
    return psutil.Process().memory_info().rss


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
    the system after each batch (:func:`release_free_memory`), so the peak does not grow with the batches.

    Args:
        model: the network, on ``device``.
        loader: batches of ``{"image": (B, C, *spatial)[, "label": ...]}``.
        device: where the network runs.
        progress: wraps the loader (e.g. a progress bar) when given.
        trim_above: trim only once the process grew by more than this many bytes since the loop began (with as
            much free in the heap), and again once it grew by as much (:class:`HeapTrimmer`; 0: after every
            batch). Training's validation passes :data:`VALIDATION_FREE_HEAP`: the training steps' heap, with
            their gradients, already holds a batch's activations, and pages trimmed after every batch were faulted
            back in by the next step (about 5 % of an epoch of the demo's network at 128x128 on 2 cores); a large
            validation split after a long epoch still fragments the heap past that.
    """
    model.eval()
    logits, labels = [], []
    trim = HeapTrimmer(trim_above) if trim_above else release_free_memory
    with torch.no_grad():
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
