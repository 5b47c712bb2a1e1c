"""End-to-end: the backbone demo config through ``medflow run``, as a user runs it: first the classification
demo (its champion becomes the backbone), then a linear probe on that champion's frozen features."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import onnxruntime
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

MEDFLOW = str(Path(sys.executable).with_name("medflow"))
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo-backbone.yaml"
SMALL = ["data.n_patients=200", "data.image_size=32", "evaluate.n_bootstrap=200",
         'promotion.rules=[{metric: overall.auc, op: ">=", value: 0.7}, {metric: shortcuts.site.auc, op: "<=", value: 1.0}]']


def _cli(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    env["PREFECT_HOME"] = str(workspace / ".medflow" / "prefect")
    return subprocess.run([MEDFLOW, *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_a_probe_on_the_registered_champion_runs_end_to_end_and_serves_without_the_source(tmp_path):
    settings = [arg for item in SMALL for arg in ("--set", item)]
    first = _cli(tmp_path, "run", *settings, "--set", "train.epochs=6", "--summary", "classifier.json")
    assert first.returncode == 0, first.stderr[-3000:]
    probe = _cli(tmp_path, "run", "--config", str(CONFIG), *settings, "--summary", "probe.json")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "Promoted: medflow-demo-probe@champion is version 1" in probe.stdout
    assert "shortcuts.site.auc <= 1" in probe.stdout
    again = _cli(tmp_path, "run", "--config", str(CONFIG), *settings)  # the alias pinned again, to the same version
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing changed since the run that finished" in again.stdout

    summary = json.loads((tmp_path / "probe.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="config.json")).read_text())
    # the alias was pinned before the run: the logged config, the key and the tags name version 1
    assert logged["train"]["backbone"]["source"] == "models:/medflow-demo-classifier/1"
    assert run.data.tags["medflow.backbone.model"] == "medflow-demo-classifier/1"
    version = client.get_model_version("medflow-demo-probe", "1")
    assert version.tags["medflow.backbone.regime"] == "linear_probe"
    assert version.tags["medflow.backbone.sha256"] == run.data.tags["medflow.backbone.sha256"]
    report = json.loads((tmp_path / ".medflow" / "runs" / summary["run_id"] / "report.json").read_text())
    assert set(report["shortcuts"]) == {"sex", "age_group", "race", "site"}
    card = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                    artifact_path="model_card/model_card.md")).read_text()
    assert f"`{version.tags['medflow.backbone.sha256']}`" in card and "## Shortcuts" in card

    # the served probe equals the evaluated probabilities, with the source model's registry entry gone
    client.delete_registered_model("medflow-demo-classifier")
    served = mlflow.pyfunc.load_model("models:/medflow-demo-probe@champion")
    manifest = pd.read_parquet(tmp_path / "data" / "demo" / "manifest.parquet")
    test = manifest[manifest["split"] == "test"].head(6)
    images = np.stack([nib.load(tmp_path / "data" / "demo" / p).get_fdata(dtype=np.float32) for p in test["image"]])
    predictions = pd.read_parquet(tmp_path / ".medflow" / "runs" / summary["run_id"] / "predictions.parquet")
    expected = predictions.set_index("case_id").loc[test["case_id"], "prob"].to_numpy()
    np.testing.assert_allclose(served.predict(images)[:, 1], expected, rtol=1e-4, atol=1e-5)

    # medflow predict and medflow export take a backbone model as any other
    new = tmp_path / "new"
    new.mkdir()
    for image in test["image"]:
        shutil.copy(tmp_path / "data" / "demo" / image, new / Path(image).name)
    predicted = _cli(tmp_path, "predict", "--model", "medflow-demo-probe@champion", "--source", str(new),
                     "--format", "nifti", "--out", "predicted")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    table = pd.read_csv(tmp_path / "predicted" / "predictions.csv")
    by_name = dict(zip(test["image"].map(lambda p: Path(p).name), expected))
    np.testing.assert_allclose(table["prob_1"], table["path"].map(by_name), rtol=1e-4, atol=1e-5)
    drift = json.loads((tmp_path / "predicted" / "drift.json").read_text())
    assert "embedding.features" in {t["fact"] for t in drift["tests"]}  # the backbone's features
    exported = _cli(tmp_path, "export", "--model", "medflow-demo-probe@champion", "--out", "probe.onnx")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "max |onnxruntime - pyfunc|" in exported.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "probe.onnx"))
    np.testing.assert_allclose(session.run(None, {"images": images})[0][:, 1], expected, rtol=1e-4, atol=1e-5)
