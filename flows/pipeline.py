"""The retraining flow: ingest -> validate -> train -> evaluate -> register -> promote.

Each step runs as a task in this flow's process unless the config places it on a
work pool (``placement``); a placed step runs as its own flow's deployment
(``medflow-<step>/<pool>``, see ``flows/steps.py`` and ``infra/prefect.yaml``).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from components import paths, tasks
from components.config import RunConfig, load_config
from components.errors import MedflowError
from flows.summary import PipelineSummary


LOCK_WAIT_S = 3600


class PlacedStepFailed(MedflowError):
    """A step placed on a work pool did not complete."""


def run_placed(step: str, pool: str, parameters: dict):
    """Run step ``step`` as deployment ``medflow-<step>/<pool>``, wait for it, return its result.

    Raises:
        PlacedStepFailed: the deployment does not exist, or its run did not complete.
    """
    from prefect.deployments import run_deployment  # noqa: PLC0415
    from prefect.exceptions import ObjectNotFound  # noqa: PLC0415

    name = f"medflow-{step}/{pool}"
    try:
        flow_run = run_deployment(name=name, parameters=parameters, timeout=None)
    except ObjectNotFound as exc:
        raise PlacedStepFailed(
            f"step {step} is placed on work pool {pool}, but there is no deployment {name}: "
            "register them with `prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml`"
        ) from exc
    state = flow_run.state
    if state is None or not state.is_completed():
        status = state.name if state else "unknown"
        raise PlacedStepFailed(f"step {step} on work pool {pool} ended {status}: {state.message if state else ''}".rstrip(": "))
    return state.result()


def _step(run_config: RunConfig, step: str, task, /, *, force: bool = False, **parameters):
    """Run one step: in this process (cached task) or on its placed work pool."""
    pool = run_config.placement.get(step)
    if pool is None:
        if not hasattr(task, "with_options"):  # ingestion: a function of two tasks
            return task(**parameters)
        return task.with_options(**({"refresh_cache": True} if force else {}))(**parameters)
    extra = {"force": force} if step in ("train", "evaluate", "register", "promote") else {}
    return run_placed(step, pool, {"workspace": str(paths.workspace_root()), **parameters, **extra})


SUMMARY_METRICS = ("auc", "accuracy", "ece", "brier", "dice", "hd95", "voxel_ece")


@flow(name="medflow-retrain")
def retrain(config: RunConfig, force: bool = False) -> PipelineSummary:
    """Retrain, evaluate and (if every gate passes) promote a model on the configured data.

    With unchanged data, config and code the cached training, evaluation, registration
    and promotion are reused; ``force`` runs them again.
    """
    dataset = _step(config, "ingest", tasks.ingest, config=config)
    report = _step(config, "validate", tasks.validate, dataset=dataset, config=config)
    if config.placement.get("train"):
        trained, reused = _step(config, "train", tasks.train, force=force, dataset=dataset, validation_report=report, config=config), False
    else:
        state = tasks.train.with_options(**({"refresh_cache": True} if force else {}))(dataset, report, config, return_state=True)
        trained, reused = state.result(), state.is_completed() and state.name == "Cached"
    evaluation = _step(config, "evaluate", tasks.evaluate, force=force, run_id=trained.run_id, dataset=dataset, config=config)
    model = _step(config, "register", tasks.register, force=force, evaluation=evaluation, dataset=dataset, config=config)
    decision = _step(config, "promote", tasks.promote, force=force, model=model, evaluation=evaluation, dataset=dataset, config=config)
    overall = json.loads(Path(evaluation.report).read_text())["overall"]
    return PipelineSummary(
        dataset=dataset.name,
        data_version=dataset.version,
        n_cases=dataset.n_cases,
        n_patients=dataset.n_patients,
        run_id=trained.run_id,
        model_name=model.name,
        version=model.version,
        metrics={k: overall.get(k) for k in SUMMARY_METRICS if k in overall} | {"temperature": evaluation.temperature},
        gates=decision.gates,
        promoted=decision.promoted,
        champion=decision.champion_after,
        reason=decision.reason,
        reused=reused,
        data_unchanged=dataset.unchanged,
    )


@flow(name="medflow-retrain-workspace")
def retrain_workspace(
    workspace: str = ".", config: str = "medflow.yaml", overrides: list[str] | None = None, force: bool = False
) -> PipelineSummary:
    """The deployments' entry point: retrain in ``workspace`` with its run config file.

    Args:
        workspace: folder holding ``medflow.yaml``, ``data/`` and ``.medflow/`` (shared storage for workers).
        config: run config, relative to the workspace.
        overrides: ``key=value`` overrides, as ``--set`` takes them.
        force: retrain even when data, config and code are unchanged.
    """
    from flows.steps import enter_workspace  # noqa: PLC0415

    from components.workspace import workspace_lock  # noqa: PLC0415

    enter_workspace(workspace)
    cfg = load_config(Path(config), overrides=overrides or [])
    cfg.check_trainable()
    with workspace_lock("retrain (deployment)", wait_s=LOCK_WAIT_S):  # a scheduled run waits for a manual one
        return retrain(cfg, force=force)
