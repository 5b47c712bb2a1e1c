"""The tracking server dies in the middle of training, and comes back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.training.checkpoint import load_checkpoint
from tests.integration.conftest import MlflowServer

pytestmark = pytest.mark.slow

MEDFLOW = str(Path(sys.executable).with_name("medflow"))
MODEL = "fault-demo"
SETTINGS = ["data.n_patients=200", "data.image_size=48", "train.epochs=25", "train.checkpoint_interval_s=0",
            "evaluate.n_bootstrap=50",
            "promotion.non_inferiority=[]", f"registry.model_name={MODEL}", "registry.experiment=faults"]


def _medflow_run(workspace: Path, url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_", "PREFECT_API_URL"))}
    env |= {"MLFLOW_TRACKING_URI": url, "PREFECT_HOME": str(workspace / ".medflow" / "prefect"),
            # MLflow's client retries with exponential backoff; kept short here
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    return subprocess.Popen([MEDFLOW, "run", *[a for s in SETTINGS for a in ("--set", s)]], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_tracking_server_lost_mid_training_fails_the_run_cleanly_and_the_rerun_resumes(tmp_path):
    server = MlflowServer(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts").start()
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    try:
        run = _medflow_run(workspace, server.url)
        deadline = time.monotonic() + 300
        state = None
        while time.monotonic() < deadline and run.poll() is None:
            saved = list((workspace / ".medflow" / "checkpoints").glob("train-*.pt"))
            state = load_checkpoint(saved[0]) if saved else None
            if state is not None and state.epoch >= 3:
                break
            time.sleep(0.1)
        assert run.poll() is None and state is not None, run.communicate()[1][-3000:]
        server.stop()  # the tracking server goes away mid-training
        out, err = run.communicate(timeout=300)
        assert run.returncode == 1, out[-2000:] + err[-2000:]
        (line,) = [line for line in err.splitlines() if line.startswith("medflow: error:")]
        assert line == (f"medflow: error: MLflow at {server.url} does not answer (connection refused, after retries); "
                        "run again once it is back (an interrupted training resumes from its last checkpoint)")
        assert "Traceback" not in err

        server.start()  # back, with the same stores
        client = MlflowClient(server.url)
        assert not client.search_registered_models(f"name='{MODEL}'")  # nothing half-registered
        again = _medflow_run(workspace, server.url)
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, out[-2000:] + err[-3000:]
        (version,) = client.search_model_versions(f"name='{MODEL}'")
        assert version.run_id == state.run_id  # resumed into the run that was cut off
        run_info = client.get_run(state.run_id)
        assert run_info.info.status == "FINISHED" and run_info.data.tags["medflow.resumed_from_epoch"]
        steps = [m.step for m in client.get_metric_history(state.run_id, "train_loss")]
        assert sorted(steps) == list(range(1, 26))  # every epoch once: none lost, none twice
        assert int(run_info.data.tags["medflow.resumed_from_epoch"]) >= state.epoch
    finally:
        server.stop()
