"""Prefect's embedded server started beside the preflight (:mod:`flows.prefect_server`): it answers once waited
for, a start that is abandoned (a refused run) leaves no server process, and a configured server starts none."""

from __future__ import annotations

import httpx
import psutil
import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows import prefect_server


def embedded_servers() -> list[psutil.Process]:
    """This process's children that serve Prefect's API (uvicorn with Prefect's app)."""
    children = psutil.Process().children(recursive=True)
    return [p for p in children if p.is_running() and "prefect.server.api.server:create_app" in " ".join(p.cmdline())]


@pytest.fixture
def prefect_home(tmp_path, monkeypatch):
    """The server's state in this test's folder: the server process reads PREFECT_HOME from the environment."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with temporary_settings(updates={PREFECT_HOME: tmp_path / "prefect"}):
        yield
    prefect_server.stop_embedded_server()  # nothing is left running whatever the test did


def test_the_server_started_early_answers_once_waited_for_and_stops(prefect_home):
    prefect_server.start_embedded_server()
    prefect_server.wait_embedded_server()
    server = SubprocessASGIServer()  # the instance Prefect's client uses
    process = server.server_process
    assert process is not None and httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
    prefect_server.stop_embedded_server()
    assert process.poll() is not None and not embedded_servers() and not prefect_server._starting


def test_a_server_still_starting_is_stopped_without_waiting_for_it(prefect_home):
    prefect_server.start_embedded_server()
    (thread,) = prefect_server._starting
    prefect_server.stop_embedded_server()  # as a refused run does, moments after the start
    assert not thread.is_alive() and not embedded_servers()
    assert SubprocessASGIServer().server_process is None and not prefect_server._starting


def test_a_configured_server_starts_no_embedded_one(prefect_home):
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        prefect_server.start_embedded_server()
    assert not prefect_server._starting and not embedded_servers()
