"""Lineage facts stamped on every run and model version."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path
from typing import Any

from components import steps

TAG_DATA_VERSION = "medflow.data_version"
TAG_DATASET = "medflow.dataset"
TAG_CONFIG_HASH = "medflow.config_hash"
TAG_CODE_VERSION = "medflow.git_commit"
TAG_CODE_HASH = "medflow.code_hash"
TAG_STEP_KEY = "medflow.key.{step}"
TAG_BACKBONE = "medflow.backbone."  # prefix: a pretrained backbone's format, arch, regime and weights' sha256
TAG_ORCHESTRATION = "medflow.prefect."  # prefix: the Prefect flow run (id, name, url) that ran the step
ORCHESTRATION_ENV = "MEDFLOW_ORCHESTRATION"  # the same facts, as JSON, for the processes torchrun starts

_orchestration: ContextVar[dict[str, str]] = ContextVar("medflow_orchestration", default={})  # noqa: B039 (read only)


@contextmanager
def orchestrated_by(facts: dict[str, str]) -> Iterator[None]:
    """Within this block runs name the orchestrator's run (``flow_run_id``, ``flow_run_name``,
    ``flow_run_url``) in their tags: set by the Prefect task that runs a step (stages import no Prefect)."""
    token = _orchestration.set({k: v for k, v in facts.items() if v})
    try:
        yield
    finally:
        _orchestration.reset(token)


def orchestration() -> dict[str, str]:
    """The facts of :func:`orchestrated_by` in effect here (or handed down in ``MEDFLOW_ORCHESTRATION``)."""
    return _orchestration.get() or json.loads(os.environ.get(ORCHESTRATION_ENV) or "{}")


def code_version() -> str:
    """The git commit of the medflow code that runs (``-dirty`` if modified), else its package version.

    Lineage only: step keys use :func:`components.steps.source_hash`, which a commit of docs or tests
    does not change."""
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


def step_tag(step: str) -> str:
    """The tag that holds a step's key on its MLflow run or model version."""
    return TAG_STEP_KEY.format(step=step)


def run_tags(config: Any, data_version: str) -> dict[str, str]:
    """The lineage every run and model version carries: data version and dataset, config hash,
    the git commit and the source hash of the code, and the Prefect flow run that ran it (if one did)."""
    return {
        TAG_DATA_VERSION: data_version,
        TAG_DATASET: config.data.name,
        TAG_CONFIG_HASH: config.config_hash(),
        TAG_CODE_VERSION: code_version(),
        TAG_CODE_HASH: steps.source_hash(),
        **{TAG_ORCHESTRATION + key: value for key, value in orchestration().items()},
    }


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
