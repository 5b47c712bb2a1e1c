"""The audit trail of a registered model: every promotion decision and rollback.

MLflow keeps no alias history, so each event is a tag on the registered model
(``medflow.history.<time>-<id>`` -> JSON). Tags live in the tracking store, so
the history survives restarts and works the same on SQLite, PostgreSQL or a
remote tracking server.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from mlflow.tracking import MlflowClient

TAG_PREFIX = "medflow.history."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class HistoryEvent:
    """One decision about a model's aliases.

    ``kind`` is ``promotion`` or ``rollback``; ``verdict`` is ``promoted``,
    ``refused`` or ``rolled back``; ``gates`` holds each rule with its value.
    """

    kind: str
    version: str
    verdict: str
    champion_before: str | None
    champion_after: str | None
    gates: list[dict] = field(default_factory=list)
    reason: str = ""
    at: str = field(default_factory=_now)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def record_event(client: MlflowClient, model_name: str, event: HistoryEvent) -> None:
    """Append ``event`` to the model's history."""
    stamp = event.at.replace(":", "").replace("-", "").replace(".", "").replace("+", "Z")
    client.set_registered_model_tag(model_name, f"{TAG_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}", event.to_json())


def read_history(client: MlflowClient, model_name: str) -> list[HistoryEvent]:
    """Every recorded event of the model, oldest first."""
    tags = client.get_registered_model(model_name).tags
    events = [HistoryEvent(**json.loads(v)) for k, v in tags.items() if k.startswith(TAG_PREFIX)]
    return sorted(events, key=lambda e: e.at)
