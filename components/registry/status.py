"""What the tracking store holds now: the latest runs with their data versions, the latest studies, and each
model's champion."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow.tracking import MlflowClient

from components import lineage
from components.registry.promote import ALIAS_CHAMPION, ALIAS_PREVIOUS, alias_version
from components.registry.lock import LOCK_SUFFIX


@dataclass(frozen=True)
class RunLine:
    """One run, newest first."""

    run_id: str
    started: str
    status: str
    experiment: str
    data_version: str
    test_auc: float | None
    test_dice: float | None = None


@dataclass(frozen=True)
class ModelLine:
    """One registered model and its aliases."""

    name: str
    latest_version: str | None
    champion: str | None
    previous_champion: str | None


def latest_runs(client: MlflowClient, *, limit: int = 10) -> list[RunLine]:
    """The ``limit`` most recent runs of every experiment."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if not experiments:
        return []
    runs = client.search_runs(list(experiments), order_by=["attributes.start_time DESC"], max_results=limit)
    return [
        RunLine(
            run_id=r.info.run_id,
            started=datetime.fromtimestamp(r.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M"),
            status=r.info.status,
            experiment=experiments[r.info.experiment_id],
            data_version=r.data.tags.get(lineage.TAG_DATA_VERSION, "-"),
            test_auc=r.data.metrics.get("test_auc"),
            test_dice=r.data.metrics.get("test_dice"),
        )
        for r in runs
    ]


@dataclass(frozen=True)
class StudyLine:
    """One study run (tag ``medflow.study``), newest first."""

    run_id: str
    started: str
    design: str
    name: str
    arms: int


def latest_studies(client: MlflowClient, *, limit: int = 5) -> list[StudyLine]:
    """The ``limit`` most recent studies of every experiment, with their number of arms' runs."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(experiments, "tags.`medflow.study` != ''", order_by=["attributes.start_time DESC"],
                              max_results=limit)
    return [StudyLine(run_id=r.info.run_id, design=r.data.tags["medflow.study"],
                      started=datetime.fromtimestamp(r.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M"),
                      name=r.data.tags.get("mlflow.runName", ""),
                      arms=int(r.data.params.get("n_arms") or len(r.data.params.get("arms", "").split(", "))))
            for r in runs]


def registered_models(client: MlflowClient) -> list[ModelLine]:
    """Every registered model (promotion locks aside) with its latest version and aliases."""
    lines = []
    for model in client.search_registered_models():
        if model.name.endswith(LOCK_SUFFIX):
            continue
        versions = [int(v.version) for v in client.search_model_versions(f"name='{model.name}'")]
        lines.append(ModelLine(
            name=model.name,
            latest_version=str(max(versions)) if versions else None,
            champion=alias_version(client, model.name, ALIAS_CHAMPION),
            previous_champion=alias_version(client, model.name, ALIAS_PREVIOUS),
        ))
    return lines
