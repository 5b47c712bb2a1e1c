"""Self-supervised pretraining of an encoder, run by the one epoch loop (:func:`components.training.loop.fit`):
the same checkpoints every epoch, resume into the same MLflow run after a kill, torchrun ranks, AMP on CUDA,
cache and workers as training.

The encoder trains on the manifest's ``train`` images only; ``val`` images are held out for the validation
loss, the collapse check and the k-NN check; ``test`` images are never read. Labels are not read for training:
a dataset without labels pretrains as well (its k-NN check is skipped). The best epoch (by validation loss)
is kept; its encoder alone (projection head dropped) is logged as the run's ``checkpoint/`` with a
``model.json`` of task ``encoder``, which the registry and ``train.backbone.source`` read.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own alias)
from monai.data import DataLoader
from monai.utils import set_determinism

from components import steps
from components.config import RunConfig, Task
from components.data.ingest import load_manifest
from components.errors import ConfigError
from components.pretraining.methods import ENCODER_CLASSES, build_method, describe_encoder
from components.training.backbones import ENCODER_TASK, pinned_source
from components.training.forward import network_input
from components.training.heap import VALIDATION_FREE_HEAP, HeapTrimmer
from components.training.datasets import cached_datasets
from components.training.loop import Recipe, TrainResult, fit, select_device
from components.training.preprocess import PreprocessSpec, intensity_stats, unreadable_images_named

STATS_SAMPLE = 256
# L2-normalised embeddings of dimension D spread with a standard deviation near 1/sqrt(D) per dimension;
# collapsed ones (every image the same embedding) with 0. Below this share of 1/sqrt(D), the run warns.
COLLAPSE_SHARE = 0.1
TOO_FEW = ("{path}: pretraining needs at least pretrain.batch_size={batch} train images for one whole batch "
           "(SimCLR contrasts the images of a batch), got {n}; lower pretrain.batch_size or add images")
NO_VAL = ("{path}: pretraining holds the val images out for its validation loss and collapse check, but the "
          "dataset has {n} val image(s); it needs at least 2 (data.splits.val)")

log = logging.getLogger("medflow.pretraining")


@dataclass(frozen=True)
class PretrainResult:
    """A finished pretraining run: its MLflow run, epochs, and the encoder's checks on the val images."""

    run_id: str
    best_epoch: int
    epochs: int
    val_loss: float | None
    embedding_std: float | None
    knn_auc: float | None = None
    resumed_from_epoch: int = 0

    @property
    def identity(self) -> str:
        """What identifies this pretraining in a step key: its MLflow run."""
        return self.run_id


def pretrain_key(config: RunConfig, data_version: str) -> str:
    """The pretraining step's key for this data version: its task-cache key and its checkpoint's name."""
    return steps.get_step("pretrain").key(config, {"dataset": data_version})


def training_view(config: RunConfig) -> RunConfig:
    """The config the epoch loop reads: ``train``'s network, epochs, batch, optimiser and seed taken from
    ``pretrain``, ``train``'s device, AMP, resume, cache, workers and ranks kept; runs in ``pretrain.experiment``."""
    cfg = config.pretrain
    train = config.train.model_copy(update={
        "model": cfg.model, "model_kwargs": cfg.model_kwargs, "backbone": None, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
        "early_stopping_patience": None})
    registry = config.registry.model_copy(update={"experiment": cfg.experiment})
    return config.model_copy(update={"train": train, "registry": registry})


def check_pretrainable(config: RunConfig) -> None:
    """Refuse, before any data is read, a pretraining that cannot run: volumes (the views are 2D), an unknown
    network, a method the network cannot train (MAE on a CNN), arguments the network does not take.

    Raises:
        ConfigError: one line naming what to change.
    """
    if config.data.task is Task.SEGMENTATION:
        raise ConfigError(f"pretraining takes 2D images; dataset {config.data.name!r} (data.task segmentation) holds "
                          "volumes, whose views medflow cannot augment yet: pretrain on 2D images")
    describe_encoder(config)


def pin_source(config: RunConfig) -> RunConfig:
    """The config with ``pretrain.source``'s registered alias pinned to its version (as a training's backbone):
    the step key, the logged config and the lineage then name the weights pretraining continued."""
    source = config.pretrain.source
    if source is None:
        return config
    try:
        pinned = pinned_source(source)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("train.backbone.source", "pretrain.source")) from exc
    return config.model_copy(update={"pretrain": config.pretrain.model_copy(update={"source": pinned})})


def embedding_spread(features: torch.Tensor) -> float:
    """The collapse check: mean over dimensions of the standard deviation of L2-normalised embeddings
    (N, D), as a share of 1/sqrt(D) (about 1 for embeddings spread evenly, 0 when they collapsed)."""
    normalised = F.normalize(features.float(), dim=1)
    return float(normalised.std(dim=0).mean() * math.sqrt(normalised.shape[1]))


def pretrain_recipe(manifest_path: Path, config: RunConfig, device: torch.device, *, data_version: str) -> Recipe:
    """The method's network, loss and cached view datasets, and the held-out validation: the method's loss on
    the val images (the same views and masks every epoch) and the spread of their embeddings."""
    cfg = config.pretrain
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    train_df, val_df = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    if len(train_df) < cfg.batch_size:
        raise ConfigError(TOO_FEW.format(path=manifest_path, batch=cfg.batch_size, n=len(train_df)))
    if len(val_df) < 2:
        raise ConfigError(NO_VAL.format(path=manifest_path, n=len(val_df)))
    size = config.data.image_size

    def data_spec() -> PreprocessSpec:  # the training split's intensity statistics
        sample = train_df.sample(min(STATS_SAMPLE, len(train_df)), random_state=cfg.seed)
        mean, std = intensity_stats(root / p for p in sample["image"])
        return PreprocessSpec(spatial_size=(size, size), mean=mean, std=std)

    parts = build_method(config, data_spec)
    spec = parts.spec
    network = parts.network.to(device)
    augment, held_out = parts.transforms(), parts.transforms()
    augment.set_random_state(seed=cfg.seed)
    records = lambda frame: [{"image": str(root / p), "label": 0} for p in frame["image"]]  # noqa: E731
    view = training_view(config)
    train_ds, val_ds, cache = cached_datasets(
        view.train, records(train_df), records(val_df), augment=augment, plain=held_out,
        key=f"pretrain-{cfg.method}-{manifest_path.resolve()}-{spec}",
        sample_bytes=4 * spec.channels * int(np.prod(spec.spatial_size)) * (2 if cfg.method == "simclr" else 1))
    # whole batches only: a lone image has no other image to be contrasted with
    val_loader = DataLoader(val_ds, batch_size=min(cfg.batch_size, len(val_df)), drop_last=True)
    loss = parts.loss

    def validate(model: torch.nn.Module) -> dict[str, float]:
        held_out.set_random_state(seed=cfg.seed + 1)  # the same views every epoch: losses compare across epochs
        model.eval()
        total, seen, features = 0.0, 0, []
        trim = HeapTrimmer(VALIDATION_FREE_HEAP)  # a long validation fragments the heap (heap.py)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)  # the same hidden patches every epoch (MAE), training's draws untouched
            for batch in val_loader:
                views = network_input(batch["image"], device)
                output, view_features = parts.held_out(model, views)
                total += float(loss(output, None)) * len(views)
                seen += len(views)
                features.append(view_features.cpu())
                trim()
        spread = embedding_spread(torch.cat(features))
        if spread < COLLAPSE_SHARE:
            log.warning("the embeddings are collapsing: their spread on the val images is %.3f of an even spread's "
                        "(below %.2f); lower pretrain.lr or raise pretrain.temperature or pretrain.batch_size",
                        spread, COLLAPSE_SHARE)
        return {"val_loss": total / seen, "embedding_std": spread}

    encoder_record = {"task": ENCODER_TASK, "network": ENCODER_TASK, "spatial_dims": 2, "in_channels": spec.channels,
                      "num_classes": ENCODER_CLASSES, "backbone": parts.description, "preprocess": spec.to_dict(),
                      "method": cfg.method, "data_version": data_version}
    return Recipe(
        network=network, train_data=train_ds, augment=augment, loss=loss, validate=validate, metric="val_loss",
        higher_is_better=False, description=encoder_record, step="pretrain", key=pretrain_key(config, data_version),
        params={"n_train": len(train_df), "n_val": len(val_df), "cache": cache.mode,
                "feature_dim": parts.description["feature_dim"]},
        tags={**parts.tags, "medflow.cache": cache.reason, "medflow.pretrain.method": cfg.method,
              "medflow.pretrain.images": "train split (val held out for the checks; test never read)"},
        export=parts.export,
    )


@unreadable_images_named()
def pretrain_encoder(*, manifest_path: Path, data_version: str, config: RunConfig,
                     params_out: Path | None = None) -> TrainResult:
    """Pretrain ``pretrain.model`` with ``pretrain.method`` on the manifest's train images (one rank; under
    torchrun each rank calls this).

    Args:
        manifest_path: ``data/<name>/manifest.parquet``; image paths are relative to its folder.
        data_version: the DVC hash of the dataset, tagged on the run.
        config: the run config (``pretrain``; ``train``'s device, AMP, resume, cache and workers).
        params_out: when given, save this rank's final parameters there as ``rank<r>.pt`` (for checks).
    """
    set_determinism(seed=config.pretrain.seed)
    device = select_device(config.train.device)
    recipe = pretrain_recipe(manifest_path, config, device, data_version=data_version)
    return fit(recipe, config=training_view(config), data_version=data_version, device=device,
               params_out=params_out, manifest_path=manifest_path)


def knn_check(encoder: torch.nn.Module, spec: PreprocessSpec, manifest: pd.DataFrame, root: Path, *,
              k: int, device: torch.device = torch.device("cpu"), num_workers: int = 0) -> float | None:
    """The encoder's k-NN check on a labelled dataset: scikit-learn's cosine k-NN classifier on the train
    images' features (taken on ``device``, ``num_workers`` processes reading the images), its AUC on the val
    images' (macro one-vs-rest for several classes). None when the
    dataset has no labels, or the val split one class."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415
    from sklearn.neighbors import KNeighborsClassifier  # noqa: PLC0415

    from components.training.forward import extract_features  # noqa: PLC0415

    if "label" not in manifest or manifest["label"].isna().all():
        return None
    labels = pd.to_numeric(manifest["label"], errors="coerce")
    labelled = manifest[labels.notna()]
    train, val = labelled[labelled["split"] == "train"], labelled[labelled["split"] == "val"]
    y_train, y_val = labels[train.index].to_numpy(int), labels[val.index].to_numpy(int)
    if len(np.unique(y_val)) < 2 or len(np.unique(y_train)) < 2:
        return None
    features = {name: extract_features(encoder.eval(), spec, frame, root, device, num_workers=num_workers,
                                       description=f"k-NN check ({name})")
                for name, frame in (("train", train), ("val", val))}
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine").fit(features["train"], y_train)
    prob = knn.predict_proba(features["val"])
    if prob.shape[1] == 2:
        return float(roc_auc_score(y_val, prob[:, 1]))
    return float(roc_auc_score(y_val, prob, multi_class="ovr", labels=knn.classes_))
