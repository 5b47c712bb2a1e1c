"""Register a pretrained encoder (``medflow pretrain``) as a version of ``<name>-encoder``.

The version is an MLflow pyfunc over the run's ``checkpoint/`` (the encoder's state_dict and its
``model.json``): ``mlflow.pyfunc.load_model("models:/demo-encoder/latest").predict(images)`` gives the
features (N, D) of images (N, H, W). ``train.backbone.source: models:/demo-encoder@latest`` starts a
classifier from the newest version (``latest`` is MLflow's reserved name for it, so no alias is set; the run
pins the version it used); the classifier's run and version carry the encoder's version and data version
(``medflow.backbone.*`` tags).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from components import lineage
from components.config import RunConfig
from components.data.step import DatasetVersion
from components.inference.model import download_checkpoint
from components.pretraining.pretrain import PretrainResult
from components.registry.register import RegisteredModel, log_pyfunc
from components.tracking import use_experiment

TAG_PRETRAIN = "medflow.pretrain."  # prefix: method, epochs, the val checks


def register_encoder(pretrained: PretrainResult, dataset: DatasetVersion, config: RunConfig) -> RegisteredModel:
    """Log the pretraining run's encoder as a pyfunc, register it as a new version of ``pretrain.name``
    (default ``<data.name>-encoder``): the newest, which ``models:/NAME@latest`` names. Tag it with its lineage
    and checks.

    Idempotent per pretraining run: a version already registered from the run is tagged and aliased again.
    """
    use_experiment(config.pretrain.experiment)
    client = MlflowClient()
    name = config.pretrain.model_name(config.data.name)
    existing = client.search_model_versions(f"name='{name}' and run_id='{pretrained.run_id}'")
    if existing:
        version = str(min(int(v.version) for v in existing))
    else:
        version = _log_and_register(pretrained.run_id, name=name)
    checks = {"val_loss": pretrained.val_loss, "embedding_std": pretrained.embedding_std,
              "knn_val_auc": pretrained.knn_auc}
    run_tags = client.get_run(pretrained.run_id).data.tags
    tags = {
        **lineage.run_tags(config, dataset.version),
        # a continued backbone: the checkpoint pretraining started from
        **{k: v for k, v in run_tags.items() if k.startswith(lineage.TAG_BACKBONE)},
        f"{TAG_PRETRAIN}method": config.pretrain.method,
        f"{TAG_PRETRAIN}network": config.pretrain.model,
        f"{TAG_PRETRAIN}epochs": str(pretrained.epochs),
        **{f"{TAG_PRETRAIN}{key}": f"{value:.4f}" for key, value in checks.items() if value is not None},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return RegisteredModel(name=name, version=version, run_id=pretrained.run_id)


def _log_and_register(run_id: str, *, name: str) -> str:
    """Log the run's encoder checkpoint as the pyfunc model and register it; the new version."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = download_checkpoint(run_id, dst=Path(tmp))
        height, width = _spatial_size(checkpoint)
        # images of any size in (the model resizes them), features out
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
        return log_pyfunc(run_id, checkpoint, signature=signature,
                          example=np.zeros((1, height, width), dtype=np.float32), name=name)


def _spatial_size(checkpoint: Path) -> tuple[int, int]:
    height, width = json.loads((checkpoint / "model.json").read_text())["preprocess"]["spatial_size"]
    return int(height), int(width)
