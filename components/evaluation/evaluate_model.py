"""The evaluation step: predict the val and test splits with a trained run's
checkpoint, fit the temperature on val, evaluate calibrated test predictions,
and log report.json and the predictions to the run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader, Dataset
from rich.progress import track

from components.config import RunConfig
from components.data.ingest import load_manifest
from components.data.labels import label_matrix
from components.evaluation.calibration import fit_temperature, sigmoid, softmax
from components.evaluation.html_report import write_html_report
from components.evaluation.metrics import classification_metrics
from components.evaluation.report import evaluate_predictions
from components.registry.model import load_checkpoint
from components.training.loop import CHECKPOINT_DIR
from components.training.preprocess import training_transforms
from components.tracking import use_experiment

REPORT_DIR = "evaluation"


@dataclass(frozen=True)
class ModelEvaluation:
    """Where an evaluation wrote its results."""

    run_id: str
    report: Path
    predictions: Path
    temperature: float


def predict_logits(model: torch.nn.Module, spec, frame: pd.DataFrame, root: Path, *, batch_size: int = 64) -> np.ndarray:
    """Logits (N, K) for the images of ``frame`` (paths relative to ``root``)."""
    records = [{"image": str(root / p)} for p in frame["image"]]
    loader = DataLoader(Dataset(records, training_transforms(spec, augment=False)), batch_size=batch_size)
    out = []
    with torch.no_grad():
        for batch in track(loader, description="Predicting", transient=True):
            out.append(model(batch["image"]).float())
    return torch.cat(out).numpy() if out else np.zeros((0, 2))


def contract_probabilities(prob: np.ndarray) -> np.ndarray:
    """(N, 2) -> (N,) positive-class probability; (N, K >= 3) unchanged."""
    return prob[:, 1] if prob.shape[1] == 2 else prob


def predictions_frame(frame: pd.DataFrame, prob: np.ndarray, *, multilabel: bool = False) -> pd.DataFrame:
    """A predictions table of the evaluation contract for the cases of ``frame``
    (multi-label: ``y_true_j`` and ``prob_j`` per label)."""
    if multilabel:
        truth = label_matrix(frame["label"], prob.shape[1])
        out = pd.DataFrame({"case_id": frame["case_id"].to_numpy()})
        for j in range(prob.shape[1]):
            out[f"y_true_{j}"], out[f"prob_{j}"] = truth[:, j], prob[:, j]
        return out
    out = pd.DataFrame({"case_id": frame["case_id"].to_numpy(), "y_true": frame["label"].to_numpy()})
    prob = contract_probabilities(prob)
    if prob.ndim == 1:
        out["prob"] = prob
    else:
        for k in range(prob.shape[1]):
            out[f"prob_{k}"] = prob[:, k]
    return out


def evaluate_run(*, run_id: str, manifest_path: Path, config: RunConfig, out_dir: Path) -> ModelEvaluation:
    """Evaluate the checkpoint of ``run_id`` on the test split and log the report to the run
    (a segmentation checkpoint: see :mod:`components.evaluation.segmentation_run`).

    Args:
        run_id: MLflow run holding ``checkpoint/``.
        manifest_path: the dataset manifest.
        config: the run config (``evaluate`` and ``data.attributes``).
        out_dir: local folder for report.json and predictions.parquet.
    """
    use_experiment(config.registry.experiment)
    checkpoint = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_DIR))
    model, spec, description = load_checkpoint(checkpoint)
    if description.get("task") == "segmentation":
        from components.evaluation.segmentation_run import evaluate_segmentation_run  # noqa: PLC0415
        return evaluate_segmentation_run(model=model, spec=spec, run_id=run_id, manifest_path=manifest_path,
                                         config=config, out_dir=out_dir)
    manifest = load_manifest(manifest_path)
    root = manifest_path.parent
    val, test = manifest[manifest["split"] == "val"], manifest[manifest["split"] == "test"]
    multilabel = description.get("task") == "multilabel"
    k = description["num_classes"]
    truth = (lambda f: label_matrix(f["label"], k)) if multilabel else (lambda f: f["label"].to_numpy())  # noqa: E731
    probabilities = sigmoid if multilabel else softmax
    val_logits = predict_logits(model, spec, val, root)
    temperature = fit_temperature(val_logits, truth(val))
    test_logits = predict_logits(model, spec, test, root)
    calibrated = predictions_frame(test, probabilities(test_logits, temperature=temperature), multilabel=multilabel)
    ev = config.evaluate
    attributes = [a for a in config.data.attributes if a in manifest.columns]
    report = evaluate_predictions(
        calibrated, manifest, attributes=attributes, threshold=ev.threshold,
        n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size,
    )
    uncalibrated = probabilities(test_logits)
    before = classification_metrics(
        truth(test), uncalibrated if multilabel else contract_probabilities(uncalibrated), threshold=ev.threshold
    )
    calibration = {"temperature": temperature, "fitted_on": "val", "before": before, "after": report.overall}
    report = dataclasses.replace(report, calibration=calibration)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = report.write_json(out_dir / "report.json")
    write_html_report(report.to_dict(), calibrated, manifest, out_dir / "report.html",
                      title=f"Evaluation of run {run_id} on {len(test)} test images")
    predictions_path = out_dir / "predictions.parquet"
    calibrated.to_parquet(predictions_path, index=False)
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(out_dir), REPORT_DIR)
        metrics = {f"test_{k}": v for k, v in report.overall.items() if isinstance(v, float)}
        metrics |= {
            f"test_{attr}_{name}": value
            for attr, summary in report.fairness.items()
            for name, value in summary.items()
            if name in ("auc_gap", "es_auc") and value is not None
        }
        mlflow.log_metrics({**metrics, "temperature": temperature, "test_ece_before_scaling": before["ece"]})
    return ModelEvaluation(run_id=run_id, report=report_path, predictions=predictions_path, temperature=temperature)
