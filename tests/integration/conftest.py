"""Real servers on 127.0.0.1: PostgreSQL (Debian's packages) and ``mlflow server``."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, *, timeout: float = 90.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_cluster(user: str = "medflow") -> Iterator[str]:
    """A throwaway PostgreSQL cluster (Debian's binaries) on 127.0.0.1; the URL of its database ``mlflow``.

    Raises:
        RuntimeError: PostgreSQL is not installed.
    """
    bin_dir = _pg_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql package")
    folder = Path(tempfile.mkdtemp(prefix="medflow-pg-"))
    folder.chmod(0o755)
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"
    run = lambda *args: subprocess.run([*as_postgres, *args], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", user)
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start",
        "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, "mlflow")
        yield f"postgresql+psycopg2://{user}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; the database ``mlflow`` for user ``medflow``."""
    if _pg_bin() is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs Debian's postgresql package")
    with postgres_cluster() as url:
        yield url


class MlflowServer:
    """``mlflow server`` on a free port of 127.0.0.1; ``restart()`` keeps the stores."""

    def __init__(self, backend_uri: str, artifacts: Path, *, app_name: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.backend_uri, self.artifacts = backend_uri, artifacts
        self.app_name, self.env = app_name, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        self.log = open(self.artifacts.parent / f"server-{self.port}.log", "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2",
             *(["--app-name", self.app_name] if self.app_name else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        wait_for(f"{self.url}/health", process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.log.close()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_server(request, tmp_path) -> Iterator[MlflowServer]:
    """A tracking server with SQLite or PostgreSQL as backend store."""
    if request.param == "sqlite":
        backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    else:
        postgres = request.getfixturevalue("postgres_url")
        database = f"mlflow_{free_port()}"
        base = postgres.rsplit("/", 1)[0]
        import sqlalchemy

        engine = sqlalchemy.create_engine(postgres, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
        engine.dispose()
        backend = f"{base}/{database}"
    server = MlflowServer(backend, tmp_path / "artifacts").start()
    yield server
    server.stop()
