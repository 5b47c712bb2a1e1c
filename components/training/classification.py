"""Image classification, one class per image or a set of classes per image (multi-label):
a MONAI classifier on 2D images, selected by validation AUC (macro over labels for multi-label).

A multi-label network has one logit per label, trained with a sigmoid
(binary cross-entropy or focal loss per label) instead of a softmax.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader
from monai.utils import set_determinism
from sklearn.metrics import roc_auc_score

from components.config import RunConfig, Task
from components.data.ingest import load_manifest
from components.data.labels import label_matrix, parse_label_set
from components.errors import ConfigError
from components.training.forward import predict_batches
from components.training.heap import VALIDATION_FREE_HEAP
from components.training.datasets import cached_datasets
from components.training.loop import Recipe, TrainResult, fit, select_device, splits
from components.training.losses import build_loss, build_multilabel_loss, class_weights, positive_weights
from components.training.models import build_classifier, classifier_kwargs
from components.training.preprocess import PreprocessSpec, intensity_stats, training_transforms, unreadable_images_named
from components.training.transfer import transfer_recipe

STATS_SAMPLE = 256


def _records(frame: pd.DataFrame, root: Path, *, multilabel: bool = False, num_classes: int = 2) -> list[dict]:
    if multilabel:
        targets = label_matrix(frame["label"], num_classes).astype(np.float32)
        return [{"image": str(root / img), "label": t} for img, t in zip(frame["image"], targets)]
    return [{"image": str(root / img), "label": int(lab)} for img, lab in zip(frame["image"], frame["label"])]


def _auc(logits: np.ndarray, labels: np.ndarray) -> float | None:
    if labels.ndim == 2:  # multi-label: macro mean over the labels that have both classes
        aucs = [roc_auc_score(labels[:, j], logits[:, j]) for j in range(labels.shape[1])
                if len(np.unique(labels[:, j])) == 2]
        return float(np.mean(aucs)) if aucs else None
    if len(np.unique(labels)) < 2:
        return None
    prob = torch.softmax(torch.tensor(logits), dim=1).numpy()
    if prob.shape[1] == 2:
        return float(roc_auc_score(labels, prob[:, 1]))
    return float(roc_auc_score(labels, prob, multi_class="ovr", labels=range(prob.shape[1])))


def check_labels(manifest: pd.DataFrame, manifest_path: Path, *, task: Task, num_classes: int) -> None:
    """Refuse a dataset whose labels are not what the task trains on (e.g. ingested for another task)."""
    labels = manifest["label"]
    if task is Task.MULTILABEL:
        ok = labels.map(lambda v: isinstance(v, str) and parse_label_set(v, num_classes) == v)
        form = f"sets of classes in 0..{num_classes - 1} written like 0|2"
    else:
        numeric = pd.to_numeric(labels, errors="coerce")
        ok = numeric.isin(range(num_classes)) & pd.api.types.is_numeric_dtype(labels)
        form = f"classes 0..{num_classes - 1}"
    if not ok.all():
        bad = manifest.loc[~ok, "case_id"].astype(str).head(3).tolist()
        raise ConfigError(f"{manifest_path}: data.task is {task.value!r} but labels of case(s) {', '.join(bad)} are "
                          f"not {form} (first: {str(labels[~ok].iloc[0])!r}); was the dataset ingested for another task "
                          "or data.num_classes?")


def classification_recipe(manifest_path: Path, config: RunConfig, device: torch.device) -> Recipe:
    """Network, cached datasets, loss and AUC validation of a 2D classifier (on ``train.backbone`` when set:
    :func:`components.training.transfer.transfer_recipe`)."""
    cfg = config.train
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    train_df, val_df = splits(manifest, manifest_path)
    check_labels(manifest, manifest_path, task=config.data.task, num_classes=config.data.num_classes)
    size = config.data.image_size

    def data_spec() -> PreprocessSpec:  # the training split's intensity statistics
        sample = train_df.sample(min(STATS_SAMPLE, len(train_df)), random_state=cfg.seed)
        mean, std = intensity_stats(root / p for p in sample["image"])
        return PreprocessSpec(spatial_size=(size, size), mean=mean, std=std)

    num_classes = config.data.num_classes
    multilabel = config.data.task is Task.MULTILABEL
    records = lambda frame: _records(frame, root, multilabel=multilabel, num_classes=num_classes)  # noqa: E731
    if multilabel:
        weights = positive_weights(cfg.class_weights, label_matrix(train_df["label"], num_classes))
        loss_for = build_multilabel_loss
    else:
        weights = class_weights(cfg.class_weights, np.bincount(train_df["label"].to_numpy(dtype=int),
                                                             minlength=num_classes), num_classes)
        loss_for = build_loss
    loss_fn = loss_for(cfg.loss, None if weights is None else weights.to(device))
    val_loss_fn = loss_for(cfg.loss, weights)

    def make_validate(val_loader: DataLoader):
        def validate(model: torch.nn.Module) -> dict[str, float]:
            logits, labels = predict_batches(model, val_loader, device, trim_above=VALIDATION_FREE_HEAP)
            scores = {"val_loss": float(val_loss_fn(torch.tensor(logits), torch.tensor(labels)))}
            auc = _auc(logits, labels)
            return scores | ({"val_auc": auc} if auc is not None else {})

        return validate

    task_description = {"task": config.data.task.value, "spatial_dims": 2, "in_channels": 1, "num_classes": num_classes}
    if cfg.backbone is not None:
        targets = ((lambda f: label_matrix(f["label"], num_classes).astype(np.float32)) if multilabel  # noqa: E731
                   else (lambda f: f["label"].to_numpy(dtype=int)))
        return transfer_recipe(config=config, device=device, manifest_path=manifest_path, train_df=train_df,
                               val_df=val_df, records=records, targets=targets, loss=loss_fn,
                               make_validate=make_validate, data_spec=data_spec, multilabel=multilabel,
                               task_description=task_description)
    spec = data_spec()
    network_kwargs = classifier_kwargs(cfg.model, image_size=size, kwargs=cfg.model_kwargs)
    network = build_classifier(
        cfg.model, spatial_dims=2, in_channels=1, num_classes=num_classes, kwargs=network_kwargs
    ).to(device)
    augment = training_transforms(spec, augment=True)
    augment.set_random_state(seed=cfg.seed)  # MONAI's random transforms keep their own RandomState
    train_ds, val_ds, cache = cached_datasets(
        cfg, records(train_df), records(val_df), augment=augment, plain=training_transforms(spec, augment=False),
        key=f"{manifest_path.resolve()}-{spec}", sample_bytes=4 * spec.channels * int(np.prod(spec.spatial_size)))
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size)
    description = {**task_description, "network": cfg.model, "network_kwargs": network_kwargs,
                   "preprocess": spec.to_dict()}
    return Recipe(network=network, train_data=train_ds, augment=augment, loss=loss_fn,
                  validate=make_validate(val_loader), metric="val_auc", description=description,
                  params={"n_train": len(train_df), "n_val": len(val_df), "cache": cache.mode},
                  tags={"medflow.cache": cache.reason})


@unreadable_images_named()
def train_classifier(
    *, manifest_path: Path, data_version: str, config: RunConfig, params_out: Path | None = None
) -> TrainResult:
    """Train a classifier (``data.task`` classification or multilabel) on the manifest's ``train`` split,
    select the epoch by ``val`` AUC.

    Args:
        manifest_path: ``data/<name>/manifest.parquet``; image paths are relative to its folder.
        data_version: the DVC hash of the dataset, tagged on the run.
        config: the run config (``train``, ``data``, ``registry`` sections).
        params_out: when given, save this rank's final parameters there as ``rank<r>.pt`` (for checks).
    """
    set_determinism(seed=config.train.seed)
    device = select_device(config.train.device)
    recipe = classification_recipe(manifest_path, config, device)
    return fit(recipe, config=config, data_version=data_version, device=device, params_out=params_out,
               manifest_path=manifest_path)
