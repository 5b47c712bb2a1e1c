"""``medflow ui``: the MLflow UI and the Prefect UI over this workspace's embedded stores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from components import paths
from components.progress import make_console
from components.errors import UiError

console = make_console()
STARTUP_TIMEOUT_S = 120


def _check_free(host: str, port: int, flag: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UiError(f"port {port} on {host} is in use ({exc.strerror}); choose another with {flag}") from exc


def _wait_healthy(url: str, process: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UiError(f"the {name} exited with code {process.returncode}; its log: {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise UiError(f"the {name} did not answer {url} within {STARTUP_TIMEOUT_S} s; its log: {log}")


def ui(
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect UI.")] = 4200,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI and the Prefect UI over this workspace's runs; print their addresses (Ctrl-C stops both).

    Where MLFLOW_TRACKING_URI or PREFECT_API_URL name a server, its address is printed instead.
    """
    home = paths.medflow_home()
    logs = home / "ui"
    logs.mkdir(exist_ok=True)
    binaries = Path(sys.executable).parent
    children: list[subprocess.Popen] = []
    lines = []
    tracking = paths.tracking_uri()
    try:
        if tracking.startswith(("http://", "https://")):
            lines.append(f"MLflow UI   {tracking}  (the tracking server in MLFLOW_TRACKING_URI)")
        else:
            _check_free(host, mlflow_port, "--mlflow-port")
            log = logs / "mlflow.log"
            children.append(subprocess.Popen(
                [str(binaries / "mlflow"), "ui", "--backend-store-uri", tracking, "--host", host, "--port", str(mlflow_port)],
                stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ | {"PATH": f"{binaries}:{os.environ['PATH']}"},
            ))
            _wait_healthy(f"http://{host}:{mlflow_port}/health", children[-1], "MLflow UI", log)
            lines.append(f"MLflow UI   http://{host}:{mlflow_port}  (tracking store {tracking})")
        api = os.environ.get("PREFECT_API_URL")
        if api:
            lines.append(f"Prefect UI  {api.removesuffix('/api')}  (the server in PREFECT_API_URL)")
        else:
            _check_free(host, prefect_port, "--prefect-port")
            log = logs / "prefect.log"
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            env |= {"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    # the UI calls the API at this address; left alone it assumes the default port 4200
                    "PREFECT_UI_API_URL": f"http://{host}:{prefect_port}/api",
                    "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(prefect_port)}
            children.append(subprocess.Popen(
                [str(binaries / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
            ))
            _wait_healthy(f"http://{host}:{prefect_port}/api/health", children[-1], "Prefect UI", log)
            lines.append(f"Prefect UI  http://{host}:{prefect_port}  (flow runs of this workspace, {home / 'prefect'})")
        for line in lines:
            console.print(line, markup=False, soft_wrap=True)
        if not children:
            return
        console.print("Ctrl-C stops them.", markup=False)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        raise UiError("a dashboard stopped; see the logs in " + str(logs))
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
