"""Promotion, history and rollback against a real tracking server (SQLite and PostgreSQL backends)."""

from __future__ import annotations

import threading

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.config import GateRule, Operator
from components.registry.history import read_history
from components.registry.lock import LOCK_SUFFIX
from components.registry.promote import ALIAS_CHAMPION, ALIAS_PREVIOUS, current_champion, decide_promotion, rollback

RULES = [GateRule(metric="overall.auc", op=Operator.GE, value=0.8)]
GOOD = {"overall": {"auc": 0.9}}
RACERS = 6


def _model(client: MlflowClient, versions: int) -> None:
    experiment = client.create_experiment("race")
    client.create_registered_model("m")
    for _ in range(versions):
        run = client.create_run(experiment)
        client.create_model_version("m", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)


def _race(client_factory, versions: list[str], compared_with: str | None) -> list:
    barrier = threading.Barrier(len(versions))
    decisions, errors = [], []

    def promote(version: str) -> None:
        client = client_factory()
        barrier.wait()
        try:
            decisions.append(decide_promotion(client=client, model_name="m", version=version, report=GOOD,
                                              rules=RULES, compared_with=compared_with))
        except Exception as exc:  # noqa: BLE001 (collected and asserted below)
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return decisions


def test_racing_promotions_leave_one_winner_and_consistent_aliases(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    _model(client, 2 * RACERS)
    first = _race(lambda: MlflowClient(mlflow_server.url), [str(v) for v in range(1, RACERS + 1)], None)
    winners = [d.version for d in first if d.promoted]
    assert len(winners) == 1
    assert current_champion(client, "m") == winners[0]
    losers = [d for d in first if not d.promoted]
    assert all(d.reason for d in losers)

    second = _race(lambda: MlflowClient(mlflow_server.url), [str(v) for v in range(RACERS + 1, 2 * RACERS + 1)], winners[0])
    new = [d.version for d in second if d.promoted]
    assert len(new) == 1
    assert current_champion(client, "m") == new[0]
    assert str(client.get_model_version_by_alias("m", ALIAS_PREVIOUS).version) == winners[0]
    assert len(read_history(client, "m")) == 2 * RACERS  # every decision is on record
    assert not [m.name for m in client.search_registered_models() if m.name.endswith(LOCK_SUFFIX)]


def test_history_and_aliases_survive_a_server_restart(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    _model(client, 2)
    decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    decide_promotion(client=client, model_name="m", version="2", report=GOOD, rules=RULES, compared_with="1")
    mlflow_server.restart()
    client = MlflowClient(mlflow_server.url)
    assert [e.version for e in read_history(client, "m")] == ["1", "2"]
    rollback(client, "m")
    assert current_champion(client, "m") == "1"
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("m", ALIAS_PREVIOUS)
    assert [e.kind for e in read_history(client, "m")] == ["promotion", "promotion", "rollback"]
    assert str(client.get_model_version_by_alias("m", ALIAS_CHAMPION).version) == "1"
