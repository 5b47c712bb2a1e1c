"""The pretraining step: pretrain an encoder on a data version (under torchrun for several ranks or nodes),
attach the version's validation report, and check the encoder by k-NN on the val images when labelled."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from components.config import RunConfig
from components.data.ingest import load_manifest
from components.data.step import DatasetVersion
from components.inference.model import load_run_model
from components.inference.predict import evaluation_device
from components.pretraining.pretrain import PretrainResult, check_pretrainable, knn_check, pretrain_encoder
from components.tracking import use_experiment


def pretrain_dataset(dataset: DatasetVersion, validation_report: Path, config: RunConfig) -> PretrainResult:
    """The pretraining step (see :func:`components.pretraining.pretrain.pretrain_encoder`); the run also gets
    the data version's validation report and, on a labelled dataset, ``knn_val_auc``."""
    check_pretrainable(config)
    if config.train.nproc_per_node > 1 or config.train.nnodes > 1:
        from components.training.distributed import launch_training  # noqa: PLC0415 (torchrun only when asked)

        trained = launch_training(manifest_path=dataset.manifest, data_version=dataset.version, config=config,
                                  entry="components.pretraining.pretrain:pretrain_encoder")
    else:
        trained = pretrain_encoder(manifest_path=dataset.manifest, data_version=dataset.version, config=config)
    use_experiment(config.pretrain.experiment)
    client = MlflowClient()
    client.log_artifact(trained.run_id, str(validation_report), "validation")
    encoder, spec, _ = load_run_model(trained.run_id)
    auc = knn_check(encoder, spec, load_manifest(dataset.manifest), dataset.manifest.parent, k=config.pretrain.knn_k,
                    device=evaluation_device(encoder, config), num_workers=config.train.num_workers)
    if auc is not None:
        client.log_metric(trained.run_id, "knn_val_auc", auc)
    # the kept epoch's spread (the run's latest value is the last epoch's, which may not be the one registered)
    spread = {m.step: m.value for m in client.get_metric_history(trained.run_id, "embedding_std")}
    return PretrainResult(run_id=trained.run_id, best_epoch=trained.best_epoch, epochs=trained.epochs,
                          val_loss=trained.best_metric, embedding_std=spread.get(trained.best_epoch), knn_auc=auc,
                          resumed_from_epoch=trained.resumed_from_epoch)
