"""``medflow ui``: both dashboards over the workspace's embedded stores, opened in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from tests.integration.conftest import free_port

TINY = ["data.n_patients=60", "data.image_size=32", "train.epochs=1", "evaluate.n_bootstrap=50",
        "validation.min_group_size=1", "promotion.rules=[]", "promotion.non_inferiority=[]"]


def test_a_busy_port_is_one_clear_line(workspace, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--mlflow-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and err.strip().endswith("choose another with --mlflow-port")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make test installs it as root)")
def test_both_dashboards_show_the_pipelines_run(workspace):
    from playwright.sync_api import sync_playwright

    assert main(["run", *[a for s in TINY for a in ("--set", s)]]) == 0
    mlflow_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    ui = subprocess.Popen([str(Path(sys.executable).with_name("medflow")), "ui", "--mlflow-port", str(mlflow_port),
                           "--prefect-port", str(prefect_port)], cwd=workspace, env=env, stdout=subprocess.PIPE, text=True)
    try:
        lines = [ui.stdout.readline() for _ in range(3)]
        assert lines[0].startswith(f"MLflow UI   http://127.0.0.1:{mlflow_port}"), lines
        assert lines[1].startswith(f"Prefect UI  http://127.0.0.1:{prefect_port}"), lines
        request = urllib.request.Request(f"http://127.0.0.1:{prefect_port}/api/flow_runs/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            flow_runs = {r["name"] for r in json.load(answer)}
        client = MlflowClient(f"sqlite:///{workspace / '.medflow' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("medflow-demo")
        (run,) = client.search_runs([experiment.experiment_id])
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{prefect_port}/runs")
            page.get_by_text(sorted(flow_runs)[0]).first.wait_for(timeout=60_000)
            page.goto(f"http://127.0.0.1:{mlflow_port}/#/experiments/{experiment.experiment_id}/runs")
            page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
            browser.close()
    finally:
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
    time.sleep(1)
    for port in (mlflow_port, prefect_port):  # both servers are gone
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
