"""MLflow set-up for a step: the tracking URI and the experiment, made when used."""

from __future__ import annotations

import mlflow

from components import paths


def use_experiment(name: str) -> str:
    """Point MLflow at the configured tracking store and return the experiment id.

    A new experiment on the embedded store keeps its artifacts under ``.medflow/artifacts``.
    """
    uri = paths.tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (paths.artifact_root() / name).as_uri() if uri.startswith("sqlite:") else None
    return mlflow.create_experiment(name, artifact_location=location)
