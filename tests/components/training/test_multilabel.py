"""Multi-label classification: labels as sets of classes from ingest to the served model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_auc_score

from components import paths
from components.config import load_config
from components.data.ingest import IngestSettings, ingest_export
from components.data.labels import label_matrix, parse_label_set
from components.errors import BadInputData
from components.evaluation.calibration import fit_temperature
from components.inference.evaluate import evaluate_run
from components.inference.model import load_checkpoint
from components.inference.predict import predict_arrays
from components.registry.register import register_model
from components.validation.step import run_validation
from components.training.classification import train_classifier
from components.training.losses import build_multilabel_loss, positive_weights
from components.training.loop import CHECKPOINT_DIR
from tests.conftest import SALT

MULTI = ["data.task=multilabel", "data.num_classes=2", "data.format=dicom", "data.source=unused", "train.epochs=2",
         "train.batch_size=16", "data.image_size=32", "registry.experiment=test-multi", "registry.model_name=multi",
         "evaluate.n_bootstrap=0", "evaluate.min_group_size=2", "promotion.non_inferiority=[]"]
SETTINGS = IngestSettings(task="multilabel", num_classes=2, val=0.2, test=0.25)


def _relabel(export, folder: Path, cell) -> Path:
    """The small export with labels rewritten as sets: 0 = lesion, 1 = imaged at site-c (its own contrast)."""
    shutil.copytree(export.folder, folder)
    labels = pd.read_csv(export.labels_csv)
    labels["label"] = [cell(lesion, site) for lesion, site in zip(labels["label"], labels["site"])]
    labels.to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


@pytest.fixture(scope="module")
def multi_dataset(small_export, tmp_path_factory) -> Path:
    def cell(lesion, site):
        return "|".join([*(["0"] if lesion else []), *(["1"] if site == "site-c" else [])][::-1])  # "1|0": unsorted

    folder = tmp_path_factory.mktemp("multi")
    labels = _relabel(small_export, folder / "export", cell)
    report, _ = ingest_export(source=folder / "export", labels_csv=labels, dataset_dir=folder / "data" / "multi",
                              settings=SETTINGS, salt=SALT)
    return report.manifest


def test_label_sets_are_stored_canonically_and_pass_validation(multi_dataset, small_export):
    manifest = pd.read_parquet(multi_dataset)
    assert set(manifest["label"]) <= {"", "0", "1", "0|1"} and "0|1" in set(manifest["label"])
    source = pd.read_csv(small_export.labels_csv)
    assert label_matrix(manifest["label"], 2)[:, 0].sum() == source["label"].sum()  # every lesion kept
    config = load_config(overrides=MULTI, environ={})
    assert run_validation(manifest, config).success


def test_a_bad_label_set_names_its_row(small_export, tmp_path):
    labels = _relabel(small_export, tmp_path / "export", lambda lesion, site: "0|2" if site == "site-b" else "0")
    with pytest.raises(BadInputData, match=r"labels.csv row \d+: label '0\|2' is not a set of classes in 0..1"):
        ingest_export(source=tmp_path / "export", labels_csv=labels, dataset_dir=tmp_path / "data" / "x",
                      settings=SETTINGS, salt=SALT)
    assert not (tmp_path / "data" / "x").exists()
    assert parse_label_set(" 1 | 0 ", 2) == "0|1" and parse_label_set(None, 2) == "" and parse_label_set("x", 2) is None


def test_losses_weights_and_temperature_match_independent_definitions():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 3), (torch.rand(64, 3) < 0.3).float()
    torch.testing.assert_close(build_multilabel_loss("cross_entropy", None)(logits, target),
                               F.binary_cross_entropy_with_logits(logits, target))
    targets = target.numpy()
    expected = (64 - targets.sum(axis=0)) / targets.sum(axis=0)
    np.testing.assert_allclose(positive_weights("balanced", targets).numpy(), expected, rtol=1e-6)
    z = logits.numpy().astype(np.float64) * 3.0
    bce = lambda t: float(F.binary_cross_entropy_with_logits(torch.tensor(z / t), target.double()))  # noqa: E731
    best = minimize_scalar(bce, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6}).x
    assert fit_temperature(z, targets) == pytest.approx(best, rel=1e-3)


def test_train_evaluate_register_and_serve_a_multilabel_classifier(workspace, multi_dataset):
    config = load_config(overrides=MULTI, environ={})
    trained = train_classifier(manifest_path=multi_dataset, data_version="v1", config=config)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=trained.run_id, artifact_path=CHECKPOINT_DIR,
                                                      tracking_uri=paths.tracking_uri()))
    model, spec, description = load_checkpoint(folder)
    assert description["task"] == "multilabel"
    manifest = pd.read_parquet(multi_dataset)
    root = multi_dataset.parent
    val = manifest[manifest["split"] == "val"]
    images = np.stack([nib.load(root / p).get_fdata(dtype=np.float32) for p in val["image"]])
    prob = predict_arrays(model, spec, images, multilabel=True)
    truth = label_matrix(val["label"], 2)
    assert trained.best_metric == pytest.approx(roc_auc_score(truth, prob, average="macro"), abs=1e-5)

    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=multi_dataset, config=config,
                              out_dir=workspace / "eval")
    report = json.loads(evaluation.report.read_text())
    table = pd.read_parquet(evaluation.predictions)
    assert report["task"] == "multilabel" and {"y_true_0", "prob_0", "y_true_1", "prob_1"} <= set(table.columns)
    expected = roc_auc_score(table[["y_true_0", "y_true_1"]], table[["prob_0", "prob_1"]], average="macro")
    assert report["overall"]["auc"] == pytest.approx(expected)

    registered = register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                                report_path=evaluation.report, config=config)
    served = mlflow.pyfunc.load_model(registered.uri)
    test = manifest.set_index("case_id").loc[table["case_id"]]
    raw = np.stack([nib.load(root / p).get_fdata(dtype=np.float32) for p in test["image"]])
    np.testing.assert_allclose(served.predict(raw), table[["prob_0", "prob_1"]].to_numpy(), atol=1e-5)
