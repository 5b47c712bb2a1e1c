"""Each pipeline step as a flow of its own, so that a deployment can run it on any work pool.

The retraining flow calls a placed step through ``run_deployment`` and passes only
the workspace path (shared storage), data versions, run ids and the config; the
step's small result comes back through Prefect's persisted results.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow

from components import steps, tasks
from components.config import RunConfig
from components.evaluation.evaluate_model import ModelEvaluation
from components.registry.promote import PromotionDecision
from components.registry.register import RegisteredModel
from components.training.loop import TrainResult


def enter_workspace(workspace: str) -> None:
    """Work in ``workspace`` (``.medflow/`` and ``data/`` live there), as the CLI does in its folder."""
    folder = Path(workspace).expanduser()
    if not folder.is_dir():
        from components.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"workspace {folder} does not exist on this worker (placed steps need shared storage)")
    os.chdir(folder)


def _fresh(force: bool) -> dict:
    return {"refresh_cache": True} if force else {}


@flow(name="medflow-ingest", persist_result=True)
def ingest_step(workspace: str, config: RunConfig) -> steps.DatasetVersion:
    """Ingest and version the configured data."""
    enter_workspace(workspace)
    return tasks.ingest(config)


@flow(name="medflow-validate", persist_result=True)
def validate_step(workspace: str, dataset: steps.DatasetVersion, config: RunConfig) -> Path:
    """Run the expectation suites on a data version."""
    enter_workspace(workspace)
    return tasks.validate(dataset, config)


@flow(name="medflow-train", persist_result=True)
def train_step(workspace: str, dataset: steps.DatasetVersion, validation_report: Path, config: RunConfig,
               force: bool = False) -> TrainResult:
    """Train on a data version (cached on data version, config and code)."""
    enter_workspace(workspace)
    return tasks.train.with_options(**_fresh(force))(dataset, validation_report, config)


@flow(name="medflow-evaluate", persist_result=True)
def evaluate_step(workspace: str, run_id: str, dataset: steps.DatasetVersion, config: RunConfig,
                  force: bool = False) -> ModelEvaluation:
    """Evaluate a training run on the test split."""
    enter_workspace(workspace)
    return tasks.evaluate.with_options(**_fresh(force))(run_id, dataset, config)


@flow(name="medflow-register", persist_result=True)
def register_step(workspace: str, evaluation: ModelEvaluation, dataset: steps.DatasetVersion, config: RunConfig,
                  force: bool = False) -> RegisteredModel:
    """Register an evaluated model as the challenger."""
    enter_workspace(workspace)
    return tasks.register.with_options(**_fresh(force))(evaluation, dataset, config)


@flow(name="medflow-promote", persist_result=True)
def promote_step(workspace: str, model: RegisteredModel, evaluation: ModelEvaluation, dataset: steps.DatasetVersion,
                 config: RunConfig, force: bool = False) -> PromotionDecision:
    """Apply the promotion policy to a challenger."""
    enter_workspace(workspace)
    return tasks.promote.with_options(**_fresh(force))(model, evaluation, dataset, config)
