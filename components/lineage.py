"""Lineage facts stamped on every run and model version."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

TAG_DATA_VERSION = "medflow.data_version"
TAG_DATASET = "medflow.dataset"
TAG_CONFIG_HASH = "medflow.config_hash"
TAG_CODE_VERSION = "medflow.git_commit"


def code_version() -> str:
    """The git commit of the medflow code that runs (``-dirty`` if modified), else its package version."""
    here = Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "components", "flows"],
            cwd=here.parent, capture_output=True, text=True, check=False,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    try:
        return f"medflow=={metadata.version('medflow')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
