"""Training on a pretrained backbone (``train.backbone``), in one of four regimes:

- ``finetune``: encoder and a new linear head train on images (optionally with layer-wise
  learning-rate decay);
- ``lora``: peft's low-rank adapters on the encoder's attention projections and the head train,
  every other weight is frozen; the adapters are merged into the weights of the checkpoint;
- ``linear_probe``: the frozen encoder's features are computed once, then a linear head trains on them;
- ``knn``: the k nearest training features vote (:class:`components.training.backbones.KNNHead`).

Frozen features are kept under ``.medflow/features/``, keyed on the weights' sha256, the
preprocessing and the manifest's content, so a re-run or a second probe does not extract them again.
Whatever the regime, the checkpoint holds a whole :class:`components.training.backbones.BackboneClassifier`
(encoder and head), so evaluation and the served model run images end to end without the original file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from torch import nn

from components import paths, steps
from components.config import RunConfig
from components.training.backbones import FROZEN_REGIMES, Backbone, describe_report, load_backbone
from components.training.heads import BackboneClassifier, KNNHead, add_lora, layer_decay_groups, merge_lora
from components.training.forward import extract_features
from components.training.datasets import cached_datasets
from components.training.loop import Recipe
from components.training.preprocess import PreprocessSpec, training_transforms

log = logging.getLogger("medflow.training")


def feature_key(backbone: Backbone, spec: PreprocessSpec, manifest_path: Path, split: str) -> str:
    """What frozen features depend on: the weights, the encoder's description, the preprocessing, the
    manifest's content, the split and the transformers version (the encoder's code)."""
    try:
        library = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        library = "none"
    material = {"weights": backbone.weights, "encoder": backbone.description, "spec": spec.to_dict(),
                "manifest": steps.file_sha256(manifest_path), "split": split, "transformers": library}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return f"{split}-{digest[:24]}"


def cached_features(backbone: Backbone, frame: pd.DataFrame, manifest_path: Path, split: str,
                    device: torch.device, *, num_workers: int = 0) -> tuple[np.ndarray, bool]:
    """The split's frozen features, from ``.medflow/features/<key>.pt`` when extracted before (else with
    ``num_workers`` processes reading the images); (features, reused)."""
    key = feature_key(backbone, backbone.spec, manifest_path, split)
    path = paths.medflow_home() / "features" / f"{key}.pt"
    case_ids = [str(c) for c in frame["case_id"]]
    if path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["case_ids"] == case_ids:
                return saved["features"].numpy(), True
        except (OSError, RuntimeError, EOFError, KeyError):
            log.warning("unreadable feature cache %s; extracting again", path)
    features = extract_features(backbone.encoder, backbone.spec, frame, manifest_path.parent, device,
                                num_workers=num_workers, description=f"Features of {split}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"case_ids": case_ids, "features": torch.as_tensor(features)}, tmp)
    tmp.replace(path)
    return features, False


def _joined(encoder_state: dict, head_prefix: str = "head.") -> Callable[[dict], dict]:
    """export: the frozen encoder's state joined to the trained head's (as a BackboneClassifier's)."""
    return lambda head_state: ({f"encoder.{k}": v for k, v in encoder_state.items()}
                               | {f"{head_prefix}{k}": v for k, v in head_state.items()})


def transfer_recipe(
    *, config: RunConfig, device: torch.device, manifest_path: Path, train_df: pd.DataFrame, val_df: pd.DataFrame,
    records: Callable[[pd.DataFrame], list[dict]], targets: Callable[[pd.DataFrame], np.ndarray],
    loss: Callable, make_validate: Callable[[DataLoader], Callable[[nn.Module], dict[str, float]]],
    data_spec: Callable[[], PreprocessSpec], multilabel: bool, task_description: dict,
) -> Recipe:
    """The recipe of a classifier on ``train.backbone`` (see the module's regimes).

    Args:
        config: the run config.
        device: where training runs.
        manifest_path: the dataset's manifest (its content keys the feature cache).
        train_df: training rows; val_df: validation rows.
        records: rows -> image records (``image`` path, ``label``).
        targets: rows -> labels (N,) or multi-hot (N, K).
        loss: the task's loss of (logits, labels).
        make_validate: a validation loader -> the recipe's ``validate``.
        data_spec: the data's own preprocessing (used by a MONAI state_dict backbone).
        multilabel: one sigmoid per label instead of a softmax.
        task_description: the description fields every classifier has (task, classes, dimensions).
    """
    cfg, settings = config.train, config.train.backbone
    backbone = load_backbone(config, data_spec=data_spec)
    log.info("backbone %s (%s): %s", settings.source, backbone.format, describe_report(backbone.report))
    spec, num_classes = backbone.spec, task_description["num_classes"]
    description = {**task_description, "network": "backbone", "backbone": backbone.description,
                   "regime": settings.regime, "preprocess": spec.to_dict(), "in_channels": spec.channels}
    common = {"tags": backbone.tags(settings.regime),
              "records": {"backbone/load_report.json": backbone.report.to_dict()},
              "params": {"n_train": len(train_df), "n_val": len(val_df), "backbone.feature_dim": backbone.feature_dim}}
    if settings.regime in FROZEN_REGIMES:
        encoder = backbone.encoder.to(device).eval()
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
        workers = config.train.num_workers
        train_features, reused = cached_features(backbone, train_df, manifest_path, "train", device,
                                                 num_workers=workers)
        val_features, _ = cached_features(backbone, val_df, manifest_path, "val", device, num_workers=workers)
        common["params"]["backbone.features_reused"] = reused
        train_targets, val_targets = targets(train_df), targets(val_df)
        as_records = lambda feats, ys: [{"image": torch.as_tensor(f), "label": y} for f, y in zip(feats, ys)]  # noqa: E731
        val_loader = DataLoader(Dataset(as_records(val_features, val_targets)), batch_size=cfg.batch_size)
        encoder_state = {k: v.detach().cpu() for k, v in backbone.encoder.state_dict().items()}
        if settings.regime == "knn":
            head = KNNHead(len(train_features), backbone.feature_dim, num_classes, k=settings.knn_k,
                           multilabel=multilabel)
            one_hot = (np.asarray(train_targets, dtype=np.float32) if multilabel
                       else np.eye(num_classes, dtype=np.float32)[np.asarray(train_targets, dtype=int)])
            head.bank.copy_(torch.as_tensor(train_features))
            head.targets.copy_(torch.as_tensor(one_hot))
            description["knn"] = {"k": settings.knn_k, "n_bank": len(train_features)}
        else:
            head = nn.Linear(backbone.feature_dim, num_classes)
        return Recipe(network=head.to(device), train_data=Dataset(as_records(train_features, train_targets)),
                      augment=Compose([]), loss=loss, validate=make_validate(val_loader), metric="val_auc",
                      description=description, export=_joined(encoder_state), **common)
    network = BackboneClassifier(backbone.encoder, nn.Linear(backbone.feature_dim, num_classes))
    export = None
    if settings.regime == "lora":
        network.encoder = add_lora(network.encoder, settings, network=backbone.arch)
        trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
        common["params"]["backbone.trainable_parameters"] = trainable

        def merged(state: dict) -> dict:  # the adapters merged into the encoder's weights
            network.load_state_dict(state)
            return merge_lora(network).state_dict()
        export = merged
    network = network.to(device).train()
    groups = (layer_decay_groups(network, lr=cfg.lr, decay=settings.layer_decay)
              if settings.regime == "finetune" and settings.layer_decay else None)
    augment = training_transforms(spec, augment=True)
    augment.set_random_state(seed=cfg.seed)
    train_ds, val_ds, cache = cached_datasets(
        cfg, records(train_df), records(val_df), augment=augment, plain=training_transforms(spec, augment=False),
        key=f"{manifest_path.resolve()}-{spec}", sample_bytes=4 * spec.channels * int(np.prod(spec.spatial_size)))
    common["params"]["cache"] = cache.mode
    common["tags"] = {**common["tags"], "medflow.cache": cache.reason}
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size)
    return Recipe(network=network, train_data=train_ds, augment=augment, loss=loss,
                  validate=make_validate(val_loader), metric="val_auc", description=description,
                  param_groups=groups, export=export, **common)
