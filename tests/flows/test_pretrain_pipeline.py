"""End-to-end: ``medflow pretrain`` in an empty folder on the demo images without their labels, as a user runs
it, then a linear probe on the labelled demo starting from the encoder it registered, which carries the
encoder's version and its (unlabelled) data version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

MEDFLOW = str(Path(sys.executable).with_name("medflow"))
SMALL = ["data.n_patients=60", "data.image_size=32", "evaluate.n_bootstrap=50"]


def _cli(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    env["PREFECT_HOME"] = str(workspace / ".medflow" / "prefect")
    return subprocess.run([MEDFLOW, *args], cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def _settings(*items: str) -> list[str]:
    return [arg for item in (*SMALL, *items) for arg in ("--set", item)]


def test_bad_pretraining_input_is_one_line_and_leaves_nothing(tmp_path):
    bad = _cli(tmp_path, "pretrain", *_settings("pretrain.model=densenett"))
    assert bad.returncode == 1 and "did you mean 'densenet'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / ".medflow").exists()


def test_pretrain_registers_an_encoder_that_a_probe_then_starts_from(tmp_path):
    pretrain = _settings("pretrain.epochs=1", "pretrain.batch_size=16", "data.task=unlabelled", "data.name=images")
    first = _cli(tmp_path, "pretrain", *pretrain, "--summary", "pretrain.json")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "images-encoder version 1" in first.stdout and "knn_val_auc null" in first.stdout  # no labels: no k-NN
    again = _cli(tmp_path, "pretrain", *pretrain)  # nothing changed: the pretraining and its version are reused
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Reused" in again.stdout and "images-encoder version 1" in again.stdout
    refused = _cli(tmp_path, "run", *_settings("data.task=unlabelled", "data.name=images"))
    assert refused.returncode == 1 and "has no labels to train on" in refused.stderr

    probe = _cli(tmp_path, "run", *_settings("train.backbone.source=models:/images-encoder@latest",
                                             "train.backbone.regime=linear_probe", "train.epochs=2"),
                 "--summary", "probe.json")
    assert probe.returncode in (0, 3), probe.stderr[-3000:]  # 3: trained, registered, not promoted
    pretrained = json.loads((tmp_path / "pretrain.json").read_text())
    summary = json.loads((tmp_path / "probe.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                 artifact_path="config.json")).read_text())
    assert logged["train"]["backbone"]["source"] == "models:/images-encoder/1"  # @latest pinned before the run
    version = client.get_model_version(summary["model_name"], summary["version"])
    for tags in (run.data.tags, version.tags):
        assert tags["medflow.backbone.model"] == "images-encoder/1"
        assert tags["medflow.backbone.run"] == pretrained["run_id"]
        assert tags["medflow.backbone.data_version"] == pretrained["data_version"] != summary["data_version"]
