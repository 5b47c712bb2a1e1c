"""The evaluation of a classifier's run (one class or a set of classes per image): predict val and
test, fit the temperature on val, judge the calibrated test predictions, log it all to the run."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from components.config import RunConfig
from components.data.ingest import load_manifest
from components.data.labels import label_matrix
from components.data.study import EXTERNAL
from components.evaluation.calibration import fit_temperature, sigmoid, softmax
from components.evaluation.declarations import FAIRNESS, MetricSettings, metric, metrics_for
from components.evaluation.external import external_evaluation
from components.evaluation.html_report import write_html_report
from components.evaluation.metrics import classification_metrics
from components.evaluation.report import evaluate_predictions
from components.evaluation.shortcuts import probe_cases, shortcut_audit
from components.inference.predict import predict_frame
from components.inference.results import EVALUATED_COLUMNS, REPORT_DIR, ModelEvaluation
from components.training.backbones import captured_features, penultimate
from components.training.forward import extract_features
from components.training.preprocess import PreprocessSpec

SHORTCUT_AUC = metric("shortcut_auc")
FAIRNESS_LOGGED = tuple(m.name for m in metrics_for("binary", kind=(FAIRNESS,)))  # test_<attribute>_<name> metrics
VAL_PREDICTIONS = "val_predictions.parquet"  # the val split's probabilities before temperature scaling


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


def audit_shortcuts(model: torch.nn.Module, spec: PreprocessSpec, manifest: pd.DataFrame, root: Path, *,
                    attributes: list[str], num_classes: int, config: RunConfig, test_features: np.ndarray,
                    device: torch.device) -> dict:
    """The shortcut audit of a classifier: its penultimate features of the train split (at most
    ``evaluate.shortcut_train_cases`` of its cases, :func:`probe_cases`) and the test split's (``test_features``,
    taken from the pass that predicted the test split), probed for each attribute
    (:func:`components.evaluation.shortcuts.shortcut_audit`)."""
    if not attributes:
        return {}
    ev = config.evaluate
    train = probe_cases(manifest[manifest["split"] == "train"], limit=ev.shortcut_train_cases, seed=ev.seed)
    test = manifest[manifest["split"] == "test"]
    train_features = extract_features(penultimate(model, num_classes), spec, train, root, device,
                                      num_workers=config.train.num_workers, description="Features of train")
    return shortcut_audit(train_features, train, test_features, test, attributes=attributes,
                          n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size)


def evaluate_classifier_run(*, model: torch.nn.Module, spec: PreprocessSpec, description: dict, run_id: str,
                            manifest_path: Path, config: RunConfig, out_dir: Path,
                            device: torch.device) -> ModelEvaluation:
    """Evaluate a loaded classifier (on ``device``) on the test split; log the report to ``run_id``."""
    manifest = load_manifest(manifest_path, columns=[*EVALUATED_COLUMNS, *config.data.attributes])
    root = manifest_path.parent
    val, test = manifest[manifest["split"] == "val"], manifest[manifest["split"] == "test"]
    multilabel = description.get("task") == "multilabel"
    k = description["num_classes"]
    truth = (lambda f: label_matrix(f["label"], k)) if multilabel else (lambda f: f["label"].to_numpy())  # noqa: E731
    probabilities = sigmoid if multilabel else softmax
    predict = functools.partial(predict_frame, model, spec, root=root, device=device,
                                num_workers=config.train.num_workers)
    val_logits = predict(val, description="Predicting val")
    temperature = fit_temperature(val_logits, truth(val))
    with captured_features(model, k) as captured:  # the shortcut audit's test features, from the same pass
        test_logits = predict(test, description="Predicting test")
    test_features = torch.cat(captured).numpy() if captured else np.zeros((0, 0), dtype=np.float32)
    captured.clear()  # the batches' copies, else held to the end beside the joined ones (N x D float32 twice)
    calibrated = predictions_frame(test, probabilities(test_logits, temperature=temperature), multilabel=multilabel)
    ev = config.evaluate
    attributes = [a for a in config.data.attributes if a in manifest.columns]
    report = evaluate_predictions(
        calibrated, manifest, attributes=attributes, threshold=ev.threshold,
        n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size,
        target_specificity=ev.target_specificity, ordinal=config.data.ordinal,
    )
    uncalibrated = probabilities(test_logits)
    before = classification_metrics(
        truth(test), uncalibrated if multilabel else contract_probabilities(uncalibrated), threshold=ev.threshold,
        settings=MetricSettings(specificity=ev.target_specificity, ordinal=config.data.ordinal),
    )
    calibration = {"temperature": temperature, "fitted_on": "val", "before": before, "after": report.overall}
    shortcuts = audit_shortcuts(model, spec, manifest, root, attributes=attributes, num_classes=k, config=config,
                                test_features=test_features, device=device)
    report = dataclasses.replace(report, calibration=calibration, shortcuts=shortcuts)
    external = manifest[manifest["split"] == EXTERNAL]
    if len(external):  # study.external_sites: never trained or tuned on, calibrated with the internal temperature
        external_logits = predict(external, description="Predicting external sites")
        external_table = predictions_frame(external, probabilities(external_logits, temperature=temperature),
                                           multilabel=multilabel)
        found, delta = external_evaluation(
            report, calibrated, external_table, manifest, attributes=attributes, threshold=ev.threshold,
            n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size,
            settings=MetricSettings(specificity=ev.target_specificity, ordinal=config.data.ordinal))
        report = dataclasses.replace(report, external=found, external_delta=delta)
        out_dir.mkdir(parents=True, exist_ok=True)
        external_table.to_parquet(out_dir / "external_predictions.parquet", index=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the val cases' probabilities before temperature scaling (it is fitted on them): a fold's out-of-fold share
    predictions_frame(val, probabilities(val_logits), multilabel=multilabel).to_parquet(
        out_dir / VAL_PREDICTIONS, index=False)
    report_path = report.write_json(out_dir / "report.json")
    write_html_report(report.to_dict(), calibrated, manifest, out_dir / "report.html",
                      title=f"Evaluation of run {run_id} on {len(test)} test images")
    predictions_path = out_dir / "predictions.parquet"
    calibrated.to_parquet(predictions_path, index=False)
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(out_dir), REPORT_DIR)
        metrics = {f"test_{k}": v for k, v in report.overall.items() if isinstance(v, float)}
        if report.external:
            metrics |= {f"external_{k}": v for k, v in report.external["overall"].items() if isinstance(v, float)}
            metrics |= {f"external_delta_{k}": v for k, v in report.external_delta.items() if isinstance(v, float)}
        metrics |= {
            f"test_{attr}_{name}": value
            for attr, summary in report.fairness.items()
            for name, value in summary.items()
            if name in FAIRNESS_LOGGED and value is not None
        }
        metrics |= {f"test_{attr}_{SHORTCUT_AUC.name}": audit[SHORTCUT_AUC.field]
                    for attr, audit in (report.shortcuts or {}).items() if audit[SHORTCUT_AUC.field] is not None}
        mlflow.log_metrics({**metrics, "temperature": temperature, "test_ece_before_scaling": before["ece"]})
    return ModelEvaluation(run_id=run_id, report=report_path, predictions=predictions_path, temperature=temperature)

