"""medflow against servers that only admit known users: MLflow's basic-auth app and a
Prefect server with ``PREFECT_SERVER_API_AUTH_STRING``, both real, on 127.0.0.1."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from tests.integration.conftest import MlflowServer, free_port, wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ADMIN, ADMIN_PASSWORD = "admin", "admin-pw-7f3c9e1d"  # the basic-auth app wants 12+ characters
TRAINER, TRAINER_PASSWORD = "trainer", "trainer-pw-4b8a2c6e"
VIEWER, VIEWER_PASSWORD = "viewer", "viewer-pw-9d1e5f3a"
PREFECT_AUTH = "medflow:prefect-pw-2c7b9e4f"
MODEL = "auth-demo"
SMALL = ["data.n_patients=80", "data.image_size=32", "train.epochs=1", "evaluate.n_bootstrap=50",
         "evaluate.min_group_size=2", "promotion.rules=[]", "promotion.non_inferiority=[]",
         f"registry.model_name={MODEL}", "registry.experiment=auth"]
SECRETS = [ADMIN_PASSWORD, TRAINER_PASSWORD, VIEWER_PASSWORD, PREFECT_AUTH.split(":")[1]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict]:
    """MLflow (basic-auth, every user READ by default) and Prefect (auth string); yields their URLs."""
    home = tmp_path_factory.mktemp("auth-servers")
    config = home / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{home / 'auth.db'}\n"
                      f"admin_username = {ADMIN}\nadmin_password = {ADMIN_PASSWORD}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "MEDFLOW"))}
    mlflow_env = clean | {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "medflow-tests-csrf",
                          "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    tracking = MlflowServer(f"sqlite:///{home / 'mlflow.db'}", home / "artifacts", app_name="basic-auth",
                            env=mlflow_env).start()
    port = free_port()
    prefect_env = clean | {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_API_AUTH_STRING": PREFECT_AUTH,
                           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    log = (home / "prefect.log").open("w")
    orchestrator = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                    env=prefect_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health", timeout=120, process=orchestrator)
        admin = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
        os.environ.update(admin)
        try:
            users = get_app_client("basic-auth", tracking_uri=tracking.url)
            users.create_user(TRAINER, TRAINER_PASSWORD)
            users.create_user(VIEWER, VIEWER_PASSWORD)
        finally:
            for key in admin:
                os.environ.pop(key)
        yield {"mlflow": tracking.url, "prefect": f"http://127.0.0.1:{port}/api", "home": home, "clean": clean}
    finally:
        orchestrator.terminate()
        orchestrator.wait(timeout=30)
        log.close()
        tracking.stop()


def _medflow(servers: dict, workspace: Path, *args: str, **credentials: str) -> subprocess.CompletedProcess:
    env = servers["clean"] | {"MLFLOW_TRACKING_URI": servers["mlflow"], "PREFECT_API_URL": servers["prefect"],
                              "PREFECT_HOME": str(workspace / ".prefect-home"), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                              "PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | credentials
    return subprocess.run([str(BIN / "medflow"), *args], cwd=workspace, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def _run(servers, workspace, **credentials):
    return _medflow(servers, workspace, "run", *[a for s in SMALL for a in ("--set", s)], **credentials)


def _as(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def _registry(servers: dict, user: str = ADMIN, password: str = ADMIN_PASSWORD) -> MlflowClient:
    os.environ.update(_as(user, password))
    return MlflowClient(servers["mlflow"])


@pytest.fixture(autouse=True)
def _no_credentials_left():
    yield
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        os.environ.pop(key, None)


@pytest.mark.parametrize(
    ("credentials", "line"),
    [
        ({}, "medflow: error: authentication failed: MLflow at {mlflow} requires credentials; set "
             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        (_as(TRAINER, "not-the-password"), "medflow: error: authentication failed: MLflow at {mlflow} refused the "
                                           "credentials of user 'trainer'"),
        (_as(TRAINER, TRAINER_PASSWORD), "medflow: error: authentication failed: the Prefect server at {prefect} "
                                         "requires credentials (HTTP 401); set PREFECT_API_AUTH_STRING"),
        (_as(TRAINER, TRAINER_PASSWORD) | {"PREFECT_API_AUTH_STRING": "medflow:wrong"},
         "medflow: error: authentication failed: the Prefect server at {prefect} refused the credentials given"),
    ],
)
def test_without_the_right_credentials_a_run_stops_at_once_in_one_line(servers, tmp_path, credentials, line):
    result = _run(servers, tmp_path, **credentials)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    err = result.stderr.strip()
    assert err.startswith(line.format(**servers)) and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()
    assert not _registry(servers).search_registered_models(f"name='{MODEL}'")  # nothing registered


def test_with_credentials_a_run_registers_and_no_secret_is_stored_and_a_reader_cannot_promote(servers, tmp_path):
    trainer = _as(TRAINER, TRAINER_PASSWORD) | {"PREFECT_API_AUTH_STRING": PREFECT_AUTH}
    result = _run(servers, tmp_path, **trainer)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Promoted: {MODEL}@champion is version 1" in result.stdout
    admin = _registry(servers)
    first = admin.get_model_version(MODEL, "1")
    assert admin.get_model_version_by_alias(MODEL, "champion").version == "1"

    # a second version of the same run; a reader (READ, the server's default) may look but not move aliases
    mlflow.set_tracking_uri(servers["mlflow"])
    second = mlflow.register_model(first.source, MODEL)
    viewer = _as(VIEWER, VIEWER_PASSWORD)
    refused = _medflow(servers, tmp_path, "promote", "-m", MODEL, "-v", second.version,
                       *[a for s in SMALL for a in ("--set", s)], **viewer)
    assert refused.returncode == 3, refused.stdout[-2000:] + refused.stderr[-2000:]
    err = refused.stderr.strip()
    warning, last = err.splitlines()  # the model card it could not log, then the refusal
    assert warning.startswith(f"WARNING the model card of refused version {second.version} is not logged: permission "
                              f"denied: MLflow at {servers['mlflow']} does not let user 'viewer' write")
    assert last.startswith(f"medflow: error: version {second.version} of {MODEL} was not promoted: permission denied: "
                           f"MLflow at {servers['mlflow']} does not let user 'viewer' call")
    assert "needs EDIT (or MANAGE) permission" in last and "the decision is not recorded" in last
    assert admin.get_model_version_by_alias(MODEL, "champion").version == "1"  # nothing moved
    history = _medflow(servers, tmp_path, "history", "-m", MODEL, **viewer)
    assert history.returncode == 0 and history.stdout.count("promotion version") == 1

    # the passwords are in the environment only: never in the workspace, the servers' stores or the output
    stores = [tmp_path, servers["home"]]
    found = []
    for root in stores:
        for path in root.rglob("*"):
            if path.is_file() and path.name not in ("basic_auth.ini", "auth.db"):  # the server's own user table
                data = path.read_bytes()
                data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
                found += [f"{path}: {s}" for s in SECRETS if s.encode() in data]
    git = subprocess.run(["git", "log", "-p", "--all"], cwd=tmp_path, capture_output=True, check=True).stdout
    found += [f"git history: {s}" for s in SECRETS if s.encode() in git]
    found += [f"output: {s}" for s in SECRETS for text in (result.stdout, result.stderr, refused.stdout, err)
              if s in text]
    assert not found
    assert any(ADMIN_PASSWORD.encode() in p.read_bytes() for p in [servers["home"] / "basic_auth.ini"])  # control
