"""The training step: train on a data version (under torchrun for several ranks or nodes) and attach
the version's validation report to the run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from components.config import RunConfig, Task
from components.data.step import DatasetVersion
from components.data.study import study_manifest
from components.tracking import use_experiment
from components.training.loop import TrainResult
from components.training.train import check_trainable, train_model


def train_dataset(dataset: DatasetVersion, validation_report: Path, config: RunConfig) -> TrainResult:
    """The training step: train on a data version (under torchrun for several ranks or nodes) and attach
    its validation report and Data Docs to the run."""
    check_trainable(config)
    # a study's view: external sites' patients out of train and val, training patients beyond a label fraction unused
    manifest = study_manifest(dataset.manifest, config.study, segmentation=config.data.task is Task.SEGMENTATION)
    if config.train.nproc_per_node > 1 or config.train.nnodes > 1:
        from components.training.distributed import launch_training  # noqa: PLC0415 (torchrun only when asked)

        result = launch_training(manifest_path=manifest, data_version=dataset.version, config=config)
    else:
        result = train_model(manifest_path=manifest, data_version=dataset.version, config=config)
    use_experiment(config.registry.experiment)
    client = MlflowClient()
    client.log_artifact(result.run_id, str(validation_report), "validation")
    docs = validation_report.with_suffix("") / "data_docs"
    if docs.is_dir():
        client.log_artifacts(result.run_id, str(docs), "validation/data_docs")
    return result
