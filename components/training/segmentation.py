"""Segmentation, 2D or 3D: a MONAI network trained on patches, validated by
sliding-window inference over whole images, selected by validation Dice.

The manifest's ``label`` column holds each image's mask (values ``0 .. K-1``).
Patches are cropped around foreground and background alike
(RandCropByPosNegLabeld); the patch is also the sliding window.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader
from monai.metrics import DiceMetric
from monai.utils import set_determinism

from components.config import RunConfig
from components.data.ingest import load_manifest
from components.errors import ConfigError
from components.training.backbones import describe_report, init_segmenter
from components.training.forward import network_input, sliding_window
from components.training.heap import VALIDATION_FREE_HEAP, HeapTrimmer
from components.training.datasets import cached_datasets
from components.training.loop import Recipe, TrainResult, fit, select_device, splits
from components.training.losses import build_seg_loss, class_weights
from components.training.models import MIN_PATCH, build_segmenter, patch_divisor, segmenter_kwargs
from components.training.preprocess import (
    SegmentationSpec, intensity_stats, read_nifti, segmentation_transforms, unreadable_images_named,
)

STATS_SAMPLE = 32
LARGEST_DEFAULT_PATCH = 96


def default_patch(shape: tuple[int, ...], *, divisor: int, least: int = 1) -> tuple[int, ...]:
    """The largest patch up to 96 per side that fits the image and the network's divisor (images smaller
    than one patch are padded)."""
    step = max(divisor, 1)
    return tuple(max(least, step, min(side, LARGEST_DEFAULT_PATCH) // step * step) for side in shape)


def _records(frame: pd.DataFrame, root: Path) -> list[dict]:
    return [{"image": str(root / img), "label": str(root / mask)} for img, mask in zip(frame["image"], frame["label"])]


def segmentation_recipe(manifest_path: Path, config: RunConfig, device: torch.device) -> Recipe:
    """Network (checked on a patch), cached patch datasets, loss and Dice validation."""
    cfg = config.train
    num_classes = config.data.num_classes
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    train_df, val_df = splits(manifest, manifest_path)
    masks = manifest["label"].map(lambda v: isinstance(v, str) and v.endswith((".nii", ".nii.gz")))
    if not masks.all():
        bad = manifest.loc[~masks, "case_id"].astype(str).head(3).tolist()
        raise ConfigError(f"{manifest_path}: data.task is 'segmentation' but case(s) {', '.join(bad)} have no mask "
                          f"(label {str(manifest.loc[~masks, 'label'].iloc[0])!r}); was the dataset ingested for another task?")
    sample = train_df.sample(min(STATS_SAMPLE, len(train_df)), random_state=cfg.seed)
    # shapes from the headers; the voxels are read one image at a time (32 full-size CT volumes are 10 GB)
    shapes = [tuple(read_nifti(root / p).shape) for p in sample["image"]]
    dims = {len(shape) for shape in shapes}
    if len(dims) != 1 or dims - {2, 3}:
        raise ConfigError(f"{manifest_path}: segmentation trains on 2D or 3D images of one kind, found {sorted(dims)}D")
    spatial_dims = dims.pop()
    smallest = tuple(int(min(shape[a] for shape in shapes)) for a in range(spatial_dims))
    kwargs = dict(cfg.model_kwargs)
    divisor = patch_divisor(cfg.model, segmenter_kwargs(cfg.model, patch_size=smallest, kwargs=kwargs))
    patch = tuple(cfg.patch_size) if cfg.patch_size else default_patch(
        smallest, divisor=divisor, least=MIN_PATCH.get(cfg.model, 1))
    network_kwargs = segmenter_kwargs(cfg.model, patch_size=patch, kwargs=kwargs)
    network = build_segmenter(cfg.model, spatial_dims=spatial_dims, in_channels=1, num_classes=num_classes,
                              patch_size=patch, kwargs=network_kwargs)
    tags, records = {}, {}
    if cfg.backbone is not None:  # start from a state_dict of this network (e.g. SwinUNETR's self-supervised encoder)
        report, tags = init_segmenter(network, config)
        logging.getLogger("medflow.training").info("backbone %s: %s", cfg.backbone.source, describe_report(report))
        records = {"backbone/load_report.json": report.to_dict()}
    network = network.to(device)
    mean, std = intensity_stats(root / p for p in sample["image"])
    spec = SegmentationSpec(patch_size=patch, mean=mean, std=std)
    augment = segmentation_transforms(spec, augment=True, samples=cfg.samples_per_volume)
    augment.set_random_state(seed=cfg.seed)
    train_ds, val_ds, cache = cached_datasets(  # an image and its mask, as float32, per cached sample
        cfg, _records(train_df, root), _records(val_df, root), augment=augment,
        plain=segmentation_transforms(spec, augment=False), key=f"{manifest_path.resolve()}-{spec}",
        sample_bytes=8 * int(np.mean([np.prod(shape) for shape in shapes])))
    tags = {**tags, "medflow.cache": cache.reason}
    val_loader = DataLoader(val_ds, batch_size=1)
    counts = np.zeros(num_classes, dtype=np.int64)
    if cfg.class_weights == "balanced":  # voxels of each class, one mask at a time
        voxels = lambda image: np.asarray(image.dataobj, dtype=np.intp).ravel()  # noqa: E731
        counts = sum((np.bincount(read_nifti(root / p, voxels), minlength=num_classes) for p in sample["label"]),
                     start=counts)
    weights = class_weights(cfg.class_weights, counts, num_classes)
    loss_fn = build_seg_loss(cfg.loss, None if weights is None else weights.to(device))
    # Dice of class-index maps (num_classes): no one-hot copies of a whole volume's prediction and mask
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=True, num_classes=num_classes)

    def validate(model: torch.nn.Module) -> dict[str, float]:
        model.eval()
        losses = []
        trim = HeapTrimmer(VALIDATION_FREE_HEAP)  # a long validation fragments the heap (heap.py)
        with torch.no_grad():
            for batch in val_loader:
                logits = sliding_window(model, network_input(batch.pop("image"), device), patch)
                label = batch["label"].to(device)
                losses.append(float(loss_fn(logits, label)))
                pred = logits.argmax(dim=1, keepdim=True)
                del logits  # a full-size CT's logits are 0.6 GB
                dice(y_pred=pred, y=label)
                trim()
        score = dice.aggregate()
        dice.reset()
        value = float(score) if torch.isfinite(score).all() else None
        return {"val_loss": float(np.mean(losses))} | ({"val_dice": value} if value is not None else {})

    description = {
        "task": "segmentation",
        "network": cfg.model,
        "network_kwargs": network_kwargs,
        "spatial_dims": spatial_dims,
        "in_channels": 1,
        "num_classes": num_classes,
        "preprocess": spec.to_dict(),
    }
    return Recipe(network=network, train_data=train_ds, augment=augment, loss=loss_fn, validate=validate,
                  metric="val_dice", description=description, tags=tags, records=records, dense=True,
                  params={"n_train": len(train_df), "n_val": len(val_df), "patch_size": list(patch),
                          "cache": cache.mode})


@unreadable_images_named()
def train_segmenter(
    *, manifest_path: Path, data_version: str, config: RunConfig, params_out: Path | None = None
) -> TrainResult:
    """Train a segmentation network on the manifest's ``train`` split, select the epoch by ``val`` Dice.

    Args:
        manifest_path: ``data/<name>/manifest.parquet``; image and mask paths are relative to its folder.
        data_version: the DVC hash of the dataset, tagged on the run.
        config: the run config (``train``, ``data``, ``registry`` sections).
        params_out: when given, save this rank's final parameters there as ``rank<r>.pt`` (for checks).

    Raises:
        ConfigError: before training, for a network, patch or loss the data cannot take.
    """
    set_determinism(seed=config.train.seed)
    device = select_device(config.train.device)
    recipe = segmentation_recipe(manifest_path, config, device)
    return fit(recipe, config=config, data_version=data_version, device=device, params_out=params_out,
               manifest_path=manifest_path)
