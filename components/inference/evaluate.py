"""The evaluation step: a trained run's checkpoint predicts the val and test splits, the temperature
is fitted on val, and the calibrated test predictions are judged by :mod:`components.evaluation`
(which sees only the predictions table); report.json and the predictions are logged to the run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from components import lineage, paths
from components.config import RunConfig, Task
from components.data.step import DatasetVersion
from components.data.study import study_manifest
from components.inference.classification import evaluate_classifier_run
from components.inference.model import load_run_model
from components.inference.predict import evaluation_device
from components.inference.results import REPORT_DIR, ModelEvaluation
from components.inference.segmentation import evaluate_segmentation_run
from components.steps import get_step
from components.tracking import use_experiment

__all__ = ["REPORT_DIR", "ModelEvaluation", "evaluate_model", "evaluate_run"]


def evaluate_run(*, run_id: str, manifest_path: Path, config: RunConfig, out_dir: Path) -> ModelEvaluation:
    """Evaluate the checkpoint of ``run_id`` on the test split and log the report to the run
    (a segmentation checkpoint: see :mod:`components.inference.segmentation`).

    Args:
        run_id: MLflow run holding ``checkpoint/``.
        manifest_path: the dataset manifest.
        config: the run config (``evaluate`` and ``data.attributes``; it predicts on ``train.device`` with
            ``train.num_workers`` processes preparing the images).
        out_dir: local folder for report.json and predictions.parquet.
    """
    use_experiment(config.registry.experiment)
    model, spec, description = load_run_model(run_id)
    device = evaluation_device(model, config)
    if description.get("task") == "segmentation":
        return evaluate_segmentation_run(model=model, spec=spec, run_id=run_id, manifest_path=manifest_path,
                                         config=config, out_dir=out_dir, device=device)
    return evaluate_classifier_run(model=model, spec=spec, description=description, run_id=run_id,
                                   manifest_path=manifest_path, config=config, out_dir=out_dir, device=device)


def evaluate_model(run_id: str, dataset: DatasetVersion, config: RunConfig) -> ModelEvaluation:
    """The evaluation step: evaluate the run's checkpoint on the test split, and on the external sites' cases
    of a study (report under ``.medflow/runs/<run_id>``), and tag the run with this step's key."""
    manifest = study_manifest(dataset.manifest, config.study, segmentation=config.data.task is Task.SEGMENTATION)
    evaluation = evaluate_run(run_id=run_id, manifest_path=manifest, config=config,
                              out_dir=paths.medflow_home() / "runs" / run_id)
    mlflow.MlflowClient().set_tag(run_id, lineage.step_tag("evaluate"),
                                  get_step("evaluate").key(config, {"run_id": run_id, "dataset": dataset}))
    return evaluation
