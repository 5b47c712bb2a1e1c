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
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from monai.data import CacheDataset, DataLoader
from monai.losses import FocalLoss
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from monai.utils import set_determinism
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import roc_auc_score

from components import lineage
from components.config import RunConfig
from components.data.ingest import load_manifest
from components.errors import ConfigError
from components.training.checkpoint import (
    TrainingState, capture_rng, checkpoint_path, load_checkpoint, restore_rng, save_checkpoint,
)
from components.training.models import build_classifier, classifier_kwargs
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
    resumed_from_epoch: int = 0


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


def class_weights(choice: str | list[float], labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Loss weights per class: none, ``balanced`` (n / (K * count), as scikit-learn's) or given."""
    if choice == "none":
        return None
    if choice == "balanced":
        counts = np.bincount(labels, minlength=num_classes).astype(float)
        if (counts == 0).any():
            missing = [k for k in range(num_classes) if counts[k] == 0]
            raise ConfigError(f"train.class_weights=balanced: class(es) {missing} have no training cases")
        return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)
    if len(choice) != num_classes:
        raise ConfigError(f"train.class_weights has {len(choice)} values; data.num_classes is {num_classes}")
    return torch.tensor(choice, dtype=torch.float32)


def build_loss(name: str, weights: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy (torch) or focal loss (MONAI) of logits (B, K) against class indices (B,)."""
    if name == "focal":
        focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=weights)
        return lambda logits, target: focal(logits, target[:, None])
    return torch.nn.CrossEntropyLoss(weight=weights)


def train_classifier(
    *, manifest_path: Path, data_version: str, config: RunConfig, params_out: Path | None = None
) -> TrainResult:
    """Train on the manifest's ``train`` split, select the epoch by ``val`` AUC.

    After every epoch the whole training state is checkpointed under
    ``.medflow/checkpoints/``; started again with the same data, config and code
    (after a crash or a kill), training resumes from the last checkpoint and logs
    into the same MLflow run. With ``train.early_stopping_patience`` it stops when
    the validation score has not improved for that many epochs.

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
    network_kwargs = classifier_kwargs(cfg.model, image_size=size, kwargs=cfg.model_kwargs)
    model = build_classifier(
        cfg.model, spatial_dims=2, in_channels=1, num_classes=num_classes, kwargs=network_kwargs
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
    weights = class_weights(cfg.class_weights, train_df["label"].to_numpy(dtype=int), num_classes)
    loss_fn = build_loss(cfg.loss, None if weights is None else weights.to(device))
    val_loss_fn = build_loss(cfg.loss, weights)
    amp = cfg.amp and device.type == "cuda"  # autocast + GradScaler on CUDA; CPU trains in float32
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    lead = rank == 0  # only rank 0 talks to MLflow, shows progress and writes checkpoints
    saved_at = checkpoint_path(config, data_version)
    resumed = load_checkpoint(saved_at) if cfg.resume else None
    best_state, best_score, best_auc, best_epoch, stale, first_epoch = None, None, None, 0, 0, 1
    if resumed is not None:
        network.load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        if resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
        restore_rng(resumed.rng, generator=generator, transforms=augment)
        best_state, best_score, best_auc = resumed.best_state, resumed.best_score, resumed.best_auc
        best_epoch, stale, first_epoch = resumed.best_epoch, resumed.stale_epochs, resumed.epoch + 1
    experiment_id = use_experiment(config.registry.experiment) if lead else None
    tags = {
        lineage.TAG_DATA_VERSION: data_version,
        lineage.TAG_DATASET: config.data.name,
        lineage.TAG_CONFIG_HASH: config.config_hash(),
        lineage.TAG_CODE_VERSION: lineage.code_version(),
    }
    if not lead:
        run_context = contextlib.nullcontext()
    elif resumed is not None:
        run_context = mlflow.start_run(run_id=resumed.run_id)
    else:
        run_context = mlflow.start_run(experiment_id=experiment_id, tags=tags)
    last_epoch = first_epoch - 1
    with run_context as run:
        if lead and resumed is None:
            mlflow.log_params(lineage.flatten(config.model_dump(mode="json")))
            mlflow.log_params({"n_train": len(train_df), "n_val": len(val_df), "device": str(device), "world_size": world})
            mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        elif lead:
            mlflow.set_tag("medflow.resumed_from_epoch", str(resumed.epoch))
        columns = [TextColumn("[bold]Training"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
        with Progress(*columns, transient=True, disable=not lead) as progress:
            task = progress.add_task("train", total=cfg.epochs, completed=first_epoch - 1, status="")
            for epoch in range(first_epoch, cfg.epochs + 1):
                if sampler is not None:
                    sampler.set_epoch(epoch)
                model.train()
                total, seen = 0.0, 0
                for batch in train_loader:
                    images, labels = batch["image"].to(device), batch["label"].to(device)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=device.type, enabled=amp):
                        loss = loss_fn(model(images), labels)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
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
                val_loss = float(val_loss_fn(torch.tensor(logits), torch.tensor(labels)))
                val_auc = _auc(logits, labels)
                metrics = {"train_loss": total / seen, "val_loss": val_loss, "lr": lr}
                if val_auc is not None:
                    metrics["val_auc"] = val_auc
                if lead:
                    mlflow.log_metrics(metrics, step=epoch)
                score = (float("-inf") if val_auc is None else val_auc, -val_loss)
                if best_score is None or score > best_score:
                    best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                    best_score, best_auc, best_epoch = score, val_auc, epoch
                    stale = 0
                else:
                    stale += 1
                last_epoch = epoch
                if lead:
                    save_checkpoint(saved_at, TrainingState(
                        epoch=epoch, run_id=run.info.run_id, model=network.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if amp else None,
                        best_state=best_state, best_score=best_score, best_auc=best_auc, best_epoch=best_epoch,
                        stale_epochs=stale, rng=capture_rng(generator=generator, transforms=augment),
                    ))
                progress.update(task, advance=1, status=f"val_auc {val_auc if val_auc is None else round(val_auc, 3)}")
                if cfg.early_stopping_patience and stale >= cfg.early_stopping_patience:
                    break
        if params_out is not None:
            params_out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in network.state_dict().items()}, params_out / f"rank{rank}.pt")
        if not lead:
            return TrainResult(run_id="", best_epoch=best_epoch, best_val_auc=best_auc, epochs=last_epoch)
        mlflow.log_metrics({"best_epoch": best_epoch, "epochs_run": last_epoch,
                            **({"best_val_auc": best_auc} if best_auc is not None else {})})
        description = {
            "network": cfg.model,
            "network_kwargs": network_kwargs,
            "spatial_dims": 2,
            "in_channels": 1,
            "num_classes": num_classes,
            "preprocess": spec.to_dict(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({k: v.cpu() for k, v in best_state.items()}, Path(tmp) / "model.pt")
            (Path(tmp) / "model.json").write_text(json.dumps(description, indent=2))
            mlflow.log_artifacts(tmp, CHECKPOINT_DIR)
    saved_at.unlink(missing_ok=True)  # finished: the next training with these inputs starts afresh
    return TrainResult(run_id=run.info.run_id, best_epoch=best_epoch, best_val_auc=best_auc, epochs=last_epoch,
                       resumed_from_epoch=resumed.epoch if resumed else 0)
