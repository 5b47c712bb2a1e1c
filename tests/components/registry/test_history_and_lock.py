from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components import paths
from components.errors import PromotionRefused
from components.registry.history import HistoryEvent, read_history, record_event
from components.registry.lock import lock_name, promotion_lock


@pytest.fixture
def client(workspace):
    mlflow.set_tracking_uri(paths.tracking_uri())
    client = MlflowClient()
    client.create_registered_model("m")
    return client


def test_history_is_kept_in_order_and_survives_a_new_client(client):
    for version in ("1", "2", "3"):
        record_event(client, "m", HistoryEvent(kind="promotion", version=version, verdict="promoted",
                                               champion_before=None, champion_after=version))
    fresh = MlflowClient(paths.tracking_uri())  # as after a restart: only the tracking store remains
    assert [e.version for e in read_history(fresh, "m")] == ["1", "2", "3"]


def test_the_lock_refuses_a_second_holder_and_is_released(client):
    with promotion_lock(client, "m", holder="version 1"):
        with pytest.raises(PromotionRefused) as info:
            with promotion_lock(client, "m", holder="version 2"):
                pass
        assert str(info.value) == (
            "another promotion of m is in progress (medflow promotion lock held by version 1); no alias was changed"
        )
    with promotion_lock(client, "m", holder="version 2"):
        pass
    assert [m.name for m in client.search_registered_models()] == ["m"]


def test_the_lock_is_released_when_the_block_fails(client):
    with pytest.raises(RuntimeError):
        with promotion_lock(client, "m", holder="x"):
            raise RuntimeError("boom")
    with promotion_lock(client, "m", holder="y"):
        pass


def test_a_stale_lock_of_a_crashed_holder_is_broken(client):
    client.create_registered_model(lock_name("m"), description="medflow promotion lock held by crashed")
    with pytest.raises(PromotionRefused):
        with promotion_lock(client, "m", holder="new", stale_after_s=3600):
            pass
    with promotion_lock(client, "m", holder="new", stale_after_s=0.0):
        pass


def test_a_lock_released_while_the_server_reports_the_conflict_is_a_lost_race(client, monkeypatch):
    # what `mlflow server` on SQLite answered a racer in benchmarks/load.py: the create conflicted, and the
    # holder had released the lock before the server looked it up for its "already exists" answer
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    def gone(name, **kwargs):
        raise MlflowException(f"Registered Model with name={name} not found", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(client, "create_registered_model", gone)
    with pytest.raises(PromotionRefused, match="another promotion of m is in progress"):
        with promotion_lock(client, "m", holder="racer"):
            pytest.fail("the lock was not taken")
