"""The champion on new studies as a Prefect flow (``medflow-predict``), and the drift event.

``medflow predict`` and this flow both call :func:`components.monitoring.predict.predict_source`. When a
batch drifts, they emit the Prefect event ``medflow.drift.detected`` (resource ``medflow.model.<name>``,
with the workspace, version and the drifted facts: no path, no UID); the ``on-drift`` deployment of
``infra/prefect.yaml`` has a trigger on it, so a Prefect automation starts a retraining run in that workspace.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from components import paths
from components.monitoring.predict import BatchResult, predict_source
from flows.steps import enter_workspace

DRIFT_EVENT = "medflow.drift.detected"
BATCH_TIME = "%Y%m%dT%H%M%SZ"  # a batch's folder under out/: the UTC second it started


def reserve_batch(out: Path) -> Path:
    """A new, empty ``out/<UTC time>/`` for one batch, made here: a run that starts in the same second as another
    into the same ``out`` (two deployments, or a manual run beside the schedule) waits for the next second rather
    than writing its predictions over the other's."""
    out.mkdir(parents=True, exist_ok=True)
    while True:
        now = datetime.now(timezone.utc)
        batch = out / now.strftime(BATCH_TIME)
        try:
            batch.mkdir()
            return batch
        except FileExistsError:
            time.sleep(1 - now.microsecond / 1e6)


def announce_drift(result: BatchResult) -> None:
    """Emit ``medflow.drift.detected`` for a batch that drifted from its model's training data."""
    model, drift = result.model, result.drift or {}
    emit_event(
        event=DRIFT_EVENT,
        resource={
            "prefect.resource.id": f"medflow.model.{model.name}",
            "medflow.workspace": str(paths.workspace_root()),
            "medflow.model_version": model.version,
            "medflow.data_version": model.data_version,
        },
        payload={"drifted": drift.get("drifted", []), "n_batch": result.n_predicted, "mlflow_run_id": result.run_id},
    )


@flow(name="medflow-predict")
def predict_workspace(workspace: str, source: str, model: str = "medflow-demo-classifier@champion",
                      format: str = "dicom", out: str = "predictions", drift_alpha: float = 0.01,  # noqa: A002
                      device: str = "auto") -> dict:
    """Predict the studies in ``source`` (relative to ``workspace``, or absolute) with ``model`` into
    ``out/<UTC time>/`` on ``device`` (auto, cpu or cuda, as ``medflow predict --device``); announce drift.
    The deployments' entry point (scheduled scoring of a watched folder).
    """
    enter_workspace(workspace)
    batch = reserve_batch(Path(out))
    try:
        result = predict_source(model, Path(source), format, batch, drift_alpha=drift_alpha, device=device)
    except BaseException:
        if batch.is_dir() and not any(batch.iterdir()):  # nothing half-written: its reserved folder goes too
            batch.rmdir()
        raise
    drift = result.drift or {}
    if drift.get("detected"):
        announce_drift(result)
    create_markdown_artifact(key="predict-batch", description=f"{result.model.name} version {result.model.version}",
                             markdown=(f"# {result.n_predicted} of {result.n_inputs} studies predicted\n\n"
                                       f"Model {result.model.name} version {result.model.version}; "
                                       f"{len(result.skipped)} unreadable; drift: "
                                       f"{', '.join(drift.get('drifted', [])) or 'none detected'}; "
                                       f"MLflow run `{result.run_id}`.\n"))
    return {"out": str(batch), "n_predicted": result.n_predicted, "n_skipped": len(result.skipped),
            "drifted": drift.get("drifted", []), "mlflow_run_id": result.run_id}
