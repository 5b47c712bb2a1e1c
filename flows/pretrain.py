"""The pretraining flow (``medflow-pretrain``): ingest -> version -> validate -> pretrain -> register_encoder.

It only sequences steps of the table (:mod:`components.steps`): the data steps are the retraining flow's
(an unchanged dataset is found, not converted again), pretraining is cached and checkpointed on its own key,
and each step may be placed on a work pool like any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from components.config import RunConfig, load_config
from flows.pipeline import LOCK_WAIT_S, StepRunner


@dataclass(frozen=True)
class PretrainSummary:
    """What a pretraining run produced."""

    dataset: str
    data_version: str
    n_cases: int
    run_id: str
    model_name: str
    version: str
    method: str
    network: str
    epochs: int
    val_loss: float | None
    embedding_std: float | None
    knn_auc: float | None
    cached_steps: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@flow(name="medflow-pretrain")
def pretrain(config: RunConfig, force: bool = False) -> PretrainSummary:
    """Pretrain the configured encoder on the configured dataset's images and register it as a new version of
    ``<name>-encoder`` (``models:/<name>@latest``). ``force`` pretrains again when nothing changed."""
    step = StepRunner(config, force=force)
    cached = step.cached
    prepared = step("ingest")
    dataset = step("version", prepared=prepared)
    report = step("validate", dataset=dataset)
    pretrained = step("pretrain", dataset=dataset, validation_report=report)
    model = step("register_encoder", pretrained=pretrained, dataset=dataset)
    summary = PretrainSummary(
        dataset=dataset.name, data_version=dataset.version, n_cases=dataset.n_cases, run_id=pretrained.run_id,
        model_name=model.name, version=model.version, method=config.pretrain.method, network=config.pretrain.model,
        epochs=pretrained.epochs, val_loss=pretrained.val_loss, embedding_std=pretrained.embedding_std,
        knn_auc=pretrained.knn_auc, cached_steps=tuple(cached))
    create_markdown_artifact(key="pretrained-encoder", description=f"{model.name} version {model.version}",
                             markdown=(f"# {model.name} version {model.version}\n\n{summary.method} on "
                                       f"{summary.network}, {summary.epochs} epochs on {dataset.name}@"
                                       f"`{dataset.version}`; MLflow run `{pretrained.run_id}`.\n"))
    return summary


@flow(name="medflow-pretrain-workspace")
def pretrain_workspace(workspace: str = ".", config: str = "medflow.yaml", overrides: list[str] | None = None,
                       force: bool = False) -> PretrainSummary:
    """The deployments' entry point: pretrain in ``workspace`` with its run config file (e.g. on a GPU pool).

    Args:
        workspace: folder holding ``medflow.yaml``, ``data/`` and ``.medflow/`` (shared storage for workers).
        config: run config, relative to the workspace.
        overrides: ``key=value`` overrides, as ``--set`` takes them.
        force: pretrain again even when data, config and code are unchanged.
    """
    from components.workspace import workspace_lock  # noqa: PLC0415
    from flows.preflight import check_pretrain  # noqa: PLC0415
    from flows.steps import enter_workspace  # noqa: PLC0415

    enter_workspace(workspace)
    cfg = check_pretrain(load_config(Path(config), overrides=overrides or []))
    with workspace_lock("pretrain (deployment)", wait_s=LOCK_WAIT_S):  # waits for a manual run in the workspace
        return pretrain(cfg, force=force)
