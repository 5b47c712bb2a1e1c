"""A k-fold study's fold ensemble as one model: the folds' checkpoints joined into one (an MLflow run whose
``checkpoint/`` holds every fold's network and temperature, :class:`components.training.ensemble.FoldEnsemble`),
judged on the test split like a trained run, so that the registration and promotion steps take it as they
take any evaluated run, and the served pyfunc gives the ensemble's calibrated probabilities."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import torch

from components import lineage, paths
from components.config import RunConfig
from components.data.ingest import load_manifest
from components.errors import EvaluationError
from components.evaluation.calibration import sigmoid, softmax
from components.evaluation.html_report import write_html_report
from components.evaluation.report import evaluate_predictions
from components.data.labels import label_matrix
from components.evaluation.declarations import MetricSettings
from components.evaluation.metrics import classification_metrics
from components.inference.classification import contract_probabilities, predictions_frame
from components.inference.model import download_checkpoint, load_checkpoint
from components.inference.predict import evaluation_device, predict_frame
from components.inference.results import EVALUATED_COLUMNS, REPORT_DIR, ModelEvaluation
from components.steps import get_step
from components.training.ensemble import ENSEMBLE
from components.training.loop import CHECKPOINT_DIR
from components.tracking import use_experiment

TAG_FOLDS = "medflow.ensemble.folds"  # the fold runs inside, comma-separated


def ensemble_checkpoint(fold_runs: Sequence[str], temperatures: Sequence[float], folder: Path) -> Path:
    """Write one checkpoint (``model.json`` + ``model.pt``) holding every fold's network and temperature.

    Raises:
        EvaluationError: a fold whose preprocessing cannot be mapped to the first's (a pretrained backbone's
            channel statistics), or folds of different tasks, classes or image sizes.
    """
    members, state = [], {}
    for k, (run_id, temperature) in enumerate(zip(fold_runs, temperatures, strict=True)):
        source = download_checkpoint(run_id, dst=folder / f"fold{k}")
        description = json.loads((source / "model.json").read_text())
        if description["preprocess"].get("channel_mean") is not None:
            raise EvaluationError(f"fold {k} (run {run_id}) normalises per channel (a pretrained backbone): its "
                                  "images cannot be mapped from another fold's, so the folds are not joined")
        members.append({**description, "temperature": float(temperature)})
        weights = torch.load(source / "model.pt", map_location="cpu", weights_only=True)
        state |= {f"members.{k}.{key}": value for key, value in weights.items()}
    first = members[0]
    for k, member in enumerate(members[1:], start=1):
        for key in ("task", "num_classes", "in_channels", "spatial_dims"):
            if member.get(key) != first.get(key):
                raise EvaluationError(f"fold {k} has {key} {member.get(key)!r}, fold 0 {first.get(key)!r}")
        if member["preprocess"]["spatial_size"] != first["preprocess"]["spatial_size"]:
            raise EvaluationError(f"fold {k} takes images of {member['preprocess']['spatial_size']}, fold 0 of "
                                  f"{first['preprocess']['spatial_size']}")
    out = folder / CHECKPOINT_DIR
    out.mkdir(parents=True)
    description = {key: first[key] for key in ("task", "spatial_dims", "in_channels", "num_classes")}
    (out / "model.json").write_text(json.dumps({**description, "network": ENSEMBLE, "preprocess": first["preprocess"],
                                                "members": members}, indent=2))
    torch.save(state, out / "model.pt")
    return out


def evaluate_fold_ensemble(*, fold_runs: Sequence[str], temperatures: Sequence[float], manifest_path: Path,
                           config: RunConfig, data_version: str) -> ModelEvaluation:
    """Join the folds into one model, log it as a run of the experiment (tagged with its folds and the data
    version), predict the test split with it and judge the predictions as a trained run's evaluation would:
    report.json and report.html with the contract's groups, fairness and calibration, its predictions.

    The folds are each calibrated on their own held-out fold, so the joined model's temperature is 1: no
    further fitting (every val case was a training case of the other folds). There is no shortcut audit:
    the folds have no one penultimate layer.
    """
    experiment_id = use_experiment(config.registry.experiment)
    key = get_step("evaluate").key(config, {"run_id": f"{ENSEMBLE}:{','.join(fold_runs)}", "dataset": data_version})
    done = _evaluated(experiment_id, key)
    if done is not None:  # the same folds judged alike before: the same run, so no new version is registered
        return done
    manifest = load_manifest(manifest_path, columns=[*EVALUATED_COLUMNS, *config.data.attributes])
    test = manifest[manifest["split"] == "test"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = ensemble_checkpoint(fold_runs, temperatures, Path(tmp))
        model, spec, description = load_checkpoint(checkpoint)
        tags = {**lineage.run_tags(config, data_version), TAG_FOLDS: ",".join(fold_runs),
                lineage.step_tag("evaluate"): key}
        with mlflow.start_run(experiment_id=experiment_id, tags=tags,
                              run_name=f"fold ensemble of {len(fold_runs)} on {config.data.name}@{data_version[:8]} "
                                       f"{when}") as run:
            mlflow.log_artifacts(str(checkpoint), CHECKPOINT_DIR)
            mlflow.log_params({"folds": len(fold_runs), "network": description["members"][0]["network"]})
    multilabel = description.get("task") == "multilabel"
    predict = functools.partial(predict_frame, model, spec, root=manifest_path.parent,
                                device=evaluation_device(model, config), num_workers=config.train.num_workers)
    logits = predict(test, description="Predicting test (fold ensemble)")
    probabilities = (sigmoid if multilabel else softmax)(logits)
    calibrated = predictions_frame(test, probabilities, multilabel=multilabel)
    ev = config.evaluate
    attributes = [a for a in config.data.attributes if a in manifest.columns]
    report = evaluate_predictions(calibrated, manifest, attributes=attributes, threshold=ev.threshold,
                                  n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size,
                                  target_specificity=ev.target_specificity, ordinal=config.data.ordinal)
    model.temperatures.fill_(1.0)  # before scaling: the mean of the folds' uncalibrated probabilities
    uncalibrated = (sigmoid if multilabel else softmax)(
        predict(test, description="Predicting test (folds unscaled)"))
    truth = label_matrix(test["label"], description["num_classes"]) if multilabel else test["label"].to_numpy()
    before = classification_metrics(truth, uncalibrated if multilabel else contract_probabilities(uncalibrated),
                                    threshold=ev.threshold, settings=MetricSettings(
                                        specificity=ev.target_specificity, ordinal=config.data.ordinal))
    calibration = {"temperature": 1.0, "fitted_on": "val (each fold on its own held-out fold)",
                   "fold_temperatures": [float(t) for t in temperatures], "before": before, "after": report.overall}
    report = dataclasses.replace(report, calibration=calibration)
    out_dir = paths.medflow_home() / "runs" / run.info.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = report.write_json(out_dir / "report.json")
    write_html_report(report.to_dict(), calibrated, manifest, out_dir / "report.html",
                      title=f"Evaluation of the fold ensemble {run.info.run_id} on {len(test)} test images")
    predictions_path = out_dir / "predictions.parquet"
    calibrated.to_parquet(predictions_path, index=False)
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_artifacts(str(out_dir), REPORT_DIR)
        mlflow.log_metrics({f"test_{k}": v for k, v in report.overall.items() if isinstance(v, float)})
    return ModelEvaluation(run_id=run.info.run_id, report=report_path, predictions=predictions_path, temperature=1.0)


def _evaluated(experiment_id: str, key: str) -> ModelEvaluation | None:
    """The fold ensemble evaluated under ``key`` before, when its run finished and its report is still here."""
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{lineage.step_tag('evaluate')}` = '{key}' and status = 'FINISHED'",
        max_results=1)
    if not runs:
        return None
    folder = paths.medflow_home() / "runs" / runs[0].info.run_id
    if not (folder / "report.json").exists() or not (folder / "predictions.parquet").exists():
        return None
    return ModelEvaluation(run_id=runs[0].info.run_id, report=folder / "report.json",
                           predictions=folder / "predictions.parquet", temperature=1.0)
