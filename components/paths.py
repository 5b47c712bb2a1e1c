"""Where medflow keeps its state. Read when used, never at import."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "MEDFLOW_HOME"


def workspace_root() -> Path:
    """The folder a run works in: the current working directory."""
    return Path.cwd()


def medflow_home_path() -> Path:
    """State folder: ``$MEDFLOW_HOME`` or ``./.medflow``, without creating it."""
    return Path(os.environ.get(HOME_ENV) or workspace_root() / ".medflow").resolve()


def medflow_home() -> Path:
    """State folder: ``$MEDFLOW_HOME`` or ``./.medflow``; created on first use."""
    home = medflow_home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


def data_root() -> Path:
    """Folder that holds the versioned datasets: ``./data``."""
    return workspace_root() / "data"


def tracking_uri() -> str:
    """MLflow tracking URI: ``$MLFLOW_TRACKING_URI`` or SQLite under the state folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{medflow_home() / 'mlflow.db'}"


def artifact_root() -> Path:
    """Artifact folder for experiments created on the embedded tracking store."""
    return medflow_home() / "artifacts"


def dvc_remote_default() -> Path:
    """The local DVC remote used when the config names none."""
    return medflow_home() / "dvc-remote"
