"""Train a MONAI classifier on a dataset's train split, logging every epoch to MLflow.

The best epoch (by validation AUC) is kept; its state_dict and the model
description (network, preprocessing) are logged as the run's ``checkpoint/``
artifacts, which the evaluation and registry steps read.

Under ``torchrun`` (see :mod:`components.training.distributed`) the same function
runs on every rank: a DistributedSampler shards the training split, the model is
wrapped in DistributedDataParallel, the training loss is reduced across ranks,
every rank scores the (small) validation split alike, and only rank 0 logs to
MLflow and saves the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from monai.utils import set_determinism
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import roc_auc_score

from components import lineage
from components.config import RunConfig
from components.data.ingest import load_manifest
from components.errors import ConfigError
from components.training.models import build_classifier
from components.training.preprocess import PreprocessSpec, intensity_stats, training_transforms
from components.tracking import use_experiment

CHECKPOINT_DIR = "checkpoint"
STATS_SAMPLE = 256


@dataclass(frozen=True)
class TrainResult:
    """A finished training run."""

    run_id: str
    best_epoch: int
    best_val_auc: float | None
    epochs: int


def select_device(choice: str) -> torch.device:
    """``auto`` takes CUDA when present; under torchrun, each rank its own GPU (``LOCAL_RANK``)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _records(frame: pd.DataFrame, root: Path) -> list[dict]:
    return [{"image": str(root / img), "label": int(lab)} for img, lab in zip(frame["image"], frame["label"])]


def _predict(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and labels (N,) of every batch of ``loader``."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(model(batch["image"].to(device)).float().cpu())
            labels.append(batch["label"])
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def _auc(logits: np.ndarray, labels: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2:
        return None
    prob = torch.softmax(torch.tensor(logits), dim=1).numpy()
    if prob.shape[1] == 2:
        return float(roc_auc_score(labels, prob[:, 1]))
    return float(roc_auc_score(labels, prob, multi_class="ovr", labels=range(prob.shape[1])))


def train_classifier(
    *, manifest_path: Path, data_version: str, config: RunConfig, params_out: Path | None = None
) -> TrainResult:
    """Train on the manifest's ``train`` split, select the epoch by ``val`` AUC.

    Args:
        manifest_path: ``data/<name>/manifest.parquet``; image paths are relative to its folder.
        data_version: the DVC hash of the dataset, tagged on the run.
        config: the run config (``train``, ``data``, ``registry`` sections).
        params_out: when given, save this rank's final parameters there as ``rank<r>.pt`` (for checks).

    Returns:
        The MLflow run id and the best epoch (the run id is empty on ranks other than 0).
    """
    cfg = config.train
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    train_df, val_df = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    if train_df.empty or val_df.empty:
        raise ConfigError(f"{manifest_path}: training needs train and val cases, got {len(train_df)} and {len(val_df)}")
    size = config.data.image_size
    sample = train_df.sample(min(STATS_SAMPLE, len(train_df)), random_state=cfg.seed)
    mean, std = intensity_stats([nib.load(root / p).get_fdata(dtype=np.float32) for p in sample["image"]])
    spec = PreprocessSpec(spatial_size=(size, size), mean=mean, std=std)
    set_determinism(seed=cfg.seed)
    device = select_device(cfg.device)
    rank, world = _world()
    num_classes = config.data.num_classes
    model = build_classifier(
        cfg.model, spatial_dims=2, in_channels=1, num_classes=num_classes, kwargs=cfg.model_kwargs
    ).to(device)
    augment = training_transforms(spec, augment=True)
    augment.set_random_state(seed=cfg.seed)  # MONAI's random transforms keep their own RandomState
    train_ds = CacheDataset(_records(train_df, root), augment, progress=False)
    val_ds = CacheDataset(_records(val_df, root), training_transforms(spec, augment=False), progress=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                              generator=generator if sampler is None else None)
    network = model
    if world > 1:
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    loss_fn = torch.nn.CrossEntropyLoss()

    lead = rank == 0  # only rank 0 talks to MLflow and shows progress
    experiment_id = use_experiment(config.registry.experiment) if lead else None
    tags = {
        lineage.TAG_DATA_VERSION: data_version,
        lineage.TAG_DATASET: config.data.name,
        lineage.TAG_CONFIG_HASH: config.config_hash(),
        lineage.TAG_CODE_VERSION: lineage.code_version(),
    }
    best_state, best_score, best_auc, best_epoch = None, None, None, 0
    run_context = mlflow.start_run(experiment_id=experiment_id, tags=tags) if lead else contextlib.nullcontext()
    with run_context as run:
        if lead:
            mlflow.log_params(lineage.flatten(config.model_dump(mode="json")))
            mlflow.log_params({"n_train": len(train_df), "n_val": len(val_df), "device": str(device), "world_size": world})
            mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        columns = [TextColumn("[bold]Training"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
        with Progress(*columns, transient=True, disable=not lead) as progress:
            task = progress.add_task("train", total=cfg.epochs, status="")
            for epoch in range(1, cfg.epochs + 1):
                if sampler is not None:
                    sampler.set_epoch(epoch)
                model.train()
                total, seen = 0.0, 0
                for batch in train_loader:
                    images, labels = batch["image"].to(device), batch["label"].to(device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(images), labels)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(labels)
                    seen += len(labels)
                if world > 1:  # the mean training loss over every rank's shard
                    sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
                    dist.all_reduce(sums)
                    total, seen = float(sums[0]), int(sums[1])
                    # DDP keeps parameters equal; BatchNorm statistics follow each rank's shard, so every rank
                    # takes rank 0's (as DDP's own broadcast_buffers does before each forward) before validating
                    for buffer in network.buffers():
                        dist.broadcast(buffer, src=0)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                logits, labels = _predict(network, val_loader, device)
                val_loss = float(loss_fn(torch.tensor(logits), torch.tensor(labels)))
                val_auc = _auc(logits, labels)
                metrics = {"train_loss": total / seen, "val_loss": val_loss, "lr": lr}
                if val_auc is not None:
                    metrics["val_auc"] = val_auc
                if lead:
                    mlflow.log_metrics(metrics, step=epoch)
                score = (float("-inf") if val_auc is None else val_auc, -val_loss)
                if best_score is None or score > best_score:
                    best_state, best_score, best_auc, best_epoch = copy.deepcopy(network.state_dict()), score, val_auc, epoch
                progress.update(task, advance=1, status=f"val_auc {val_auc if val_auc is None else round(val_auc, 3)}")
        if params_out is not None:
            params_out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in network.state_dict().items()}, params_out / f"rank{rank}.pt")
        if not lead:
            return TrainResult(run_id="", best_epoch=best_epoch, best_val_auc=best_auc, epochs=cfg.epochs)
        mlflow.log_metrics({"best_epoch": best_epoch, **({"best_val_auc": best_auc} if best_auc is not None else {})})
        description = {
            "network": cfg.model,
            "network_kwargs": cfg.model_kwargs,
            "spatial_dims": 2,
            "in_channels": 1,
            "num_classes": num_classes,
            "preprocess": spec.to_dict(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({k: v.cpu() for k, v in best_state.items()}, Path(tmp) / "model.pt")
            (Path(tmp) / "model.json").write_text(json.dumps(description, indent=2))
            mlflow.log_artifacts(tmp, CHECKPOINT_DIR)
    return TrainResult(run_id=run.info.run_id, best_epoch=best_epoch, best_val_auc=best_auc, epochs=cfg.epochs)
