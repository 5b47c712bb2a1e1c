"""A real ``prefect server start`` on 127.0.0.1: both work pools, infra/prefect.yaml deployed, a process worker.

One module-scoped server and worker serve every test here; each test starts runs
and waits for their final state through the Prefect client.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = [
    "data.n_patients=60", "data.image_size=32", "train.epochs=1", "evaluate.n_bootstrap=50",
    "validation.min_group_size=1", "promotion.rules=[]", "promotion.non_inferiority=[]",
]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """Server, pools, deployments and a process worker; yields (environment, workspace)."""
    home = tmp_path_factory.mktemp("prefect-home")
    workspace = tmp_path_factory.mktemp("workspace")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MEDFLOW"))}
    env |= {
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PATH": f"{BIN}:{env['PATH']}",
        "MEDFLOW_SOURCE": str(REPO), "MEDFLOW_WORKSPACE": str(workspace),
    }
    logs = home / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=(logs / "server.log").open("w"), stderr=subprocess.STDOUT)
    worker = None
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", timeout=120, process=server)
        run = lambda *args, cwd=REPO: subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
        for pool in (["medflow-local", "--type", "process"],
                     ["medflow-k8s", "--type", "kubernetes", "--base-job-template",
                      str(REPO / "infra" / "prefect" / "k8s-base-job-template.json")]):
            done = run(str(BIN / "prefect"), "work-pool", "create", *pool)
            assert done.returncode == 0, done.stdout + done.stderr
        deployed = run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        init = run(str(BIN / "medflow"), "init", *[a for s in SMALL for a in ("--set", s)], cwd=workspace)
        assert init.returncode == 0, init.stdout + init.stderr
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "medflow-local", "--type", "process"],
                                  env=env, cwd=workspace, stdout=(logs / "worker.log").open("w"), stderr=subprocess.STDOUT)
        yield env, workspace, run
    finally:
        for process in (worker, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def _client_call(env: dict, fn):
    """Run ``fn(client)`` against the test server (the client reads PREFECT_API_URL from the settings)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(go())


def _wait(env: dict, flow_run_id, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _client_call(env, lambda c: c.read_flow_run(flow_run_id))
        if run.state and run.state.type.value in FINAL:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s")


def _start(env: dict, deployment: str, parameters: dict | None = None):
    async def go(client):
        found = await client.read_deployment_by_name(deployment)
        return await client.create_flow_run_from_deployment(found.id, parameters=parameters or {})

    return _client_call(env, go)


def _registered_versions(workspace: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / '.medflow' / 'mlflow.db'}")
    return sorted(str(v.version) for v in client.search_model_versions("name='medflow-demo-classifier'"))


def _triggered_run(env: dict, deployment: str, timeout: float = 120.0):
    """The first run an automation started for ``deployment``, waited for up to ``timeout`` seconds."""

    async def triggered(client):
        found = await client.read_deployment_by_name(deployment)
        return [r for r in await client.read_flow_runs() if r.deployment_id == found.id]

    deadline = time.monotonic() + timeout
    while not (runs := _client_call(env, triggered)) and time.monotonic() < deadline:
        time.sleep(2)
    assert runs, f"the automation started no run of {deployment}"
    return runs[0]


def test_pools_and_every_deployment_are_registered(prefect):
    env, _, _ = prefect

    async def read(client):
        pools = {p.name: p.type for p in await client.read_work_pools()}
        deployments = await client.read_deployments()
        flows = {f.id: f.name for f in await client.read_flows()}
        return pools, {f"{flows[d.flow_id]}/{d.name}": d for d in deployments}

    pools, deployments = _client_call(env, read)
    assert pools == {"medflow-local": "process", "medflow-k8s": "kubernetes"}
    for step in ("ingest", "validate", "train", "evaluate", "register", "promote"):
        assert deployments[f"medflow-{step}/medflow-local"].work_pool_name == "medflow-local"
    assert deployments["medflow-train/medflow-k8s"].work_pool_name == "medflow-k8s"
    weekly = deployments["medflow-retrain-workspace/weekly"]
    assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"] and weekly.schedules[0].active
    template = _client_call(env, lambda c: c.read_work_pool("medflow-k8s")).base_job_template
    resources = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpus }}"


def test_a_deploy_without_its_two_variables_is_refused_at_deploy_time(prefect):
    """Without MEDFLOW_SOURCE and MEDFLOW_WORKSPACE the paths resolved to empty strings and the scheduled run
    crashed later on the worker; now `prefect deploy` stops, saying which to set, and changes nothing."""
    env, workspace, _ = prefect
    bare = {k: v for k, v in env.items() if k not in ("MEDFLOW_SOURCE", "MEDFLOW_WORKSPACE")}
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "weekly", "--prefect-file",
                           "infra/prefect.yaml"], cwd=REPO, env=bare, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "medflow: set MEDFLOW_SOURCE (the checkout the process workers run) and MEDFLOW_WORKSPACE" in (
        done.stdout + done.stderr)
    weekly = _client_call(env, lambda c: c.read_deployment_by_name("medflow-retrain-workspace/weekly"))
    assert weekly.parameters["workspace"] == str(workspace)  # the registered deployment is untouched
    assert weekly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)


def test_a_process_worker_runs_the_weekly_deployment_with_training_placed_on_its_pool(prefect):
    env, workspace, _ = prefect
    flow_run = _start(env, "medflow-retrain-workspace/weekly", {"overrides": ["placement.train=medflow-local"]})
    finished = _wait(env, flow_run.id)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    async def placed_runs(client):
        deployment = await client.read_deployment_by_name("medflow-train/medflow-local")
        return [r for r in await client.read_flow_runs() if r.deployment_id == deployment.id]

    (placed,) = _client_call(env, placed_runs)  # the training step ran as its own deployment's flow run
    assert placed.state.type.value == "COMPLETED" and placed.parameters["workspace"] == str(workspace)
    assert _registered_versions(workspace) == ["1"]
    assert finished.state.name == "Promoted"  # the Prefect UI shows the verdict, not only "Completed"
    (decision,) = [a for a in _client_call(env, lambda c: c.read_artifacts()) if a.key == "promotion-decision"]
    assert decision.type == "markdown"
    assert "**Promoted**: medflow-demo-classifier@champion is version 1" in decision.data
    assert "/#/experiments/" in decision.data and "| `overall.auc" not in decision.data  # the policy had no rules


async def _placed_train_runs(client):
    deployment = await client.read_deployment_by_name("medflow-train/medflow-local")
    return [r for r in await client.read_flow_runs() if r.deployment_id == deployment.id]


def test_a_study_with_training_placed_runs_each_arm_as_a_run_of_the_pools_deployment(prefect):
    """Each arm's process (a Dask worker here) starts the training deployment on the pool and waits for it: one
    placed flow run per arm, each with its arm's fold, and the study registers its fold ensemble."""
    env, workspace, _ = prefect
    before = {r.id for r in _client_call(env, _placed_train_runs)}
    versions = _registered_versions(workspace)
    flow_run = _start(env, "medflow-retrain-workspace/weekly",
                      {"overrides": ["placement.train=medflow-local", "study.folds=3", "study.parallel=2"]})
    finished = _wait(env, flow_run.id, timeout=900)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    arms = [r for r in _client_call(env, _placed_train_runs) if r.id not in before]
    assert all(r.state.type.value == "COMPLETED" for r in arms)
    assert sorted(str(r.parameters["config"]["study"]["fold"]) for r in arms) == ["0", "1", "2", "None"]
    assert len(_registered_versions(workspace)) == len(versions) + 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / '.medflow' / 'mlflow.db'}")
    newest = max(client.search_model_versions("name='medflow-demo-classifier'"), key=lambda v: int(v.version))
    study = client.get_run(client.get_run(newest.run_id).data.tags["mlflow.parentRunId"])
    assert study.data.params["n_arms"] == str(len(arms))  # its trainings; the joined ensemble is nested, not an arm


def test_a_placed_step_without_deployment_fails_the_run_cleanly(prefect):
    env, workspace, _ = prefect
    before = _registered_versions(workspace)
    flow_run = _start(env, "medflow-retrain-workspace/weekly",
                      {"overrides": ["placement.train=medflow-gpu-pool", "train.epochs=2"]})
    finished = _wait(env, flow_run.id)
    assert finished.state.type.value == "FAILED"
    assert "no deployment medflow-train/medflow-gpu-pool" in finished.state.message
    assert _registered_versions(workspace) == before  # nothing half-registered


def test_a_new_data_version_triggers_a_retraining_run(prefect):
    env, workspace, run = prefect
    config = workspace / "medflow.yaml"
    config.write_text(config.read_text().replace("n_patients: 60", "n_patients: 75"))
    before = _registered_versions(workspace)
    ingested = run(str(BIN / "medflow"), "ingest", "--config", "medflow.yaml", cwd=workspace)
    assert ingested.returncode == 0 and "Announced medflow.data.version.created" in ingested.stdout, ingested.stderr
    finished = _wait(env, _triggered_run(env, "medflow-retrain-workspace/on-new-data").id)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert finished.parameters["workspace"] == str(workspace)
    assert len(_registered_versions(workspace)) == len(before) + 1
    summary = json.loads((workspace / ".medflow" / "ingest" / "demo-report.json").read_text())
    assert summary["unchanged"]  # the triggered run found the version medflow ingest had made


def test_a_run_cancelled_mid_training_registers_nothing_and_the_next_run_is_clean(prefect):
    from mlflow.tracking import MlflowClient
    from prefect.states import Cancelling

    env, workspace, _ = prefect
    before = _registered_versions(workspace)
    flow_run = _start(env, "medflow-retrain-workspace/weekly", {"overrides": ["train.epochs=300"]})

    async def training(client):
        return [t for t in await client.read_task_runs() if t.name.startswith("train") and t.state and t.state.is_running()]

    tracking = MlflowClient(f"sqlite:///{workspace / '.medflow' / 'mlflow.db'}")

    def training_run() -> list:  # the training's MLflow run, open: the cancellation lands while it is
        experiment = tracking.get_experiment_by_name("medflow-demo")
        return experiment and tracking.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")

    deadline = time.monotonic() + 180
    while not (_client_call(env, training) and training_run()) and time.monotonic() < deadline:
        time.sleep(1)
    assert _client_call(env, training) and training_run(), "training never started"
    _client_call(env, lambda c: c.set_flow_run_state(flow_run.id, Cancelling(), force=True))
    finished = _wait(env, flow_run.id)
    assert finished.state.type.value == "CANCELLED"
    assert _registered_versions(workspace) == before  # nothing half-registered
    assert not training_run()

    later = _start(env, "medflow-retrain-workspace/weekly", {"overrides": ["train.epochs=2"]})
    assert _wait(env, later.id).state.type.value == "COMPLETED"
    assert len(_registered_versions(workspace)) == len(before) + 1


def test_a_drifting_batch_of_new_studies_triggers_a_retraining_run(prefect):
    """The champion predicts a batch from a scanner three times brighter than training's: medflow predict says
    so, announces medflow.drift.detected, and the on-drift deployment's automation retrains."""
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    env, workspace, run = prefect
    assert run(str(BIN / "medflow"), "run", cwd=workspace).returncode in (0, 3)  # a champion to predict with
    manifest = pd.read_parquet(workspace / "data" / "demo" / "manifest.parquet")
    brighter = workspace / "brighter"
    brighter.mkdir(exist_ok=True)
    for image in manifest[manifest["split"] == "test"]["image"]:
        scan = nib.load(workspace / "data" / "demo" / image)
        nib.save(nib.Nifti1Image(scan.get_fdata(dtype=np.float32) * 3, scan.affine), brighter / Path(image).name)
    predicted = run(str(BIN / "medflow"), "predict", "--model", "medflow-demo-classifier@champion", "--source",
                    "brighter", "--format", "nifti", "--out", "predictions", cwd=workspace)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    verdict = next(line for line in predicted.stdout.splitlines() if line.startswith("Drift"))
    assert "DRIFT in input.mean" in verdict and "Announced medflow.drift.detected" in predicted.stdout
    finished = _wait(env, _triggered_run(env, "medflow-retrain-workspace/on-drift").id)
    assert finished.state.type.value == "COMPLETED", finished.state.message
    assert finished.parameters["workspace"] == str(workspace)
