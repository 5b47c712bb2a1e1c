"""The retraining flow: ingest -> validate -> train -> evaluate -> register -> promote."""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefect import flow

from components import tasks
from components.config import RunConfig
from components.registry.gates import GateResult


@dataclass(frozen=True)
class PipelineSummary:
    """What a retraining run produced."""

    dataset: str
    data_version: str
    n_cases: int
    n_patients: int
    run_id: str
    model_name: str
    version: str
    metrics: dict
    gates: tuple[GateResult, ...]
    promoted: bool
    champion: str | None
    reason: str = ""
    reused: bool = False


@flow(name="medflow-retrain")
def retrain(config: RunConfig, force: bool = False) -> PipelineSummary:
    """Retrain, evaluate and (if every gate passes) promote a model on the configured data.

    With unchanged data, config and code the cached training, evaluation, registration
    and promotion are reused; ``force`` runs them again.
    """
    fresh = {"refresh_cache": True} if force else {}
    dataset = tasks.ingest(config)
    report = tasks.validate(dataset, config)
    trained_state = tasks.train.with_options(**fresh)(dataset, report, config, return_state=True)
    trained = trained_state.result()
    evaluation = tasks.evaluate.with_options(**fresh)(trained.run_id, dataset, config)
    model = tasks.register.with_options(**fresh)(evaluation, dataset, config)
    decision = tasks.promote.with_options(**fresh)(model, evaluation, dataset, config)
    overall = json.loads(evaluation.report.read_text())["overall"]
    return PipelineSummary(
        dataset=dataset.name,
        data_version=dataset.version,
        n_cases=dataset.n_cases,
        n_patients=dataset.n_patients,
        run_id=trained.run_id,
        model_name=model.name,
        version=model.version,
        metrics={k: overall.get(k) for k in ("auc", "accuracy", "ece", "brier")} | {"temperature": evaluation.temperature},
        gates=decision.gates,
        promoted=decision.promoted,
        champion=decision.champion_after,
        reason=decision.reason,
        reused=trained_state.is_completed() and trained_state.name == "Cached",
    )
