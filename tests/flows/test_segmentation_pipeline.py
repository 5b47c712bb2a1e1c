"""End-to-end: the segmentation demo config through ``medflow run``, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

MEDFLOW = str(Path(sys.executable).with_name("medflow"))
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo-segmentation.yaml"


def test_segmentation_demo_runs_end_to_end_and_the_served_model_reproduces_its_masks(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    env["PREFECT_HOME"] = str(tmp_path / ".medflow" / "prefect")
    run = subprocess.run([MEDFLOW, "run", "--config", str(CONFIG), "--summary", "summary.json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Promoted: medflow-demo-segmenter@champion is version 1" in run.stdout
    assert "overall.dice >= 0.6" in run.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["dice"] >= 0.6 and summary["promoted"]

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    run_id = summary["run_id"]
    evaluation = tmp_path / ".medflow" / "runs" / run_id
    report = json.loads((evaluation / "report.json").read_text())
    assert report["task"] == "segmentation" and report["overall"]["dice"] == pytest.approx(summary["metrics"]["dice"])
    assert report["calibration"]["after"]["voxel_ece"] < report["calibration"]["before"]["voxel_ece"]
    for groups in report["groups"].values():  # each group's Dice with its interval, drawn in the page
        assert all(g["ci95"]["dice"][0] <= g["dice"] <= g["ci95"]["dice"][1] for g in groups.values() if g["dice"])
    page = (evaluation / "report.html").read_text()
    assert "<h2>Test cases</h2>" in page and page.count("data:image/png;base64,") == 2
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test_dice"] == pytest.approx(report["overall"]["dice"]) and "test_sex_dice_gap" in metrics
    version = client.get_model_version_by_alias("medflow-demo-segmenter", "champion")
    assert version.tags["medflow.test_dice"] == str(report["overall"]["dice"])
    card = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model_card/model_card.md")).read_text()
    assert "Image segmentation" in card and "Dice gap" in card and "VOXEL ECE" in card

    # the registered pyfunc segments a raw test volume into the mask the evaluation wrote
    predictions = pd.read_parquet(evaluation / "predictions.parquet")
    manifest = pd.read_parquet(tmp_path / "data" / "demo-seg" / "manifest.parquet").set_index("case_id")
    case = predictions.iloc[0]
    volume = nib.load(tmp_path / "data" / "demo-seg" / manifest.at[case["case_id"], "image"]).get_fdata(dtype=np.float32)
    served = mlflow.pyfunc.load_model("models:/medflow-demo-segmenter@champion").predict(volume[None])
    assert served.shape == (1, 2, *volume.shape)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)
    written = np.asarray(nib.load(evaluation / case["mask"]).dataobj)
    assert (served[0].argmax(axis=0) == written).mean() > 0.999

    # a version compared with itself on its test set: its logged masks against its pyfunc's, nothing between them
    compared = subprocess.run([MEDFLOW, "compare", "--model", "medflow-demo-segmenter", "1", "1", "--json", "cmp.json",
                               "--n-bootstrap", "200"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
    assert compared.returncode == 0, compared.stderr[-3000:]
    table = json.loads((tmp_path / "cmp.json").read_text())
    dice = next(r for r in table["metrics"] if r["name"] == "dice")
    assert dice["a"] == pytest.approx(report["overall"]["dice"], abs=1e-6)
    assert abs(dice["difference"]) < 0.01 and dice["better"] == ""
    assert {r["name"] for r in table["fairness"]} == {f"{a}.dice_gap" for a in report["fairness"]}
