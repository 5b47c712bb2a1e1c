"""Move the ``champion`` alias when every gate passes; roll back; record every decision.

Aliases move only inside the model's promotion lock, and only if the champion
is still the one the challenger was compared with, so two racing promotions
never both win and the aliases are never left half-moved. Every decision (pass
or refuse, each rule with its value) is kept on the version (tag
``medflow.promotion``) and in the model's history.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from components.config import GateRule
from components.errors import PromotionRefused, RegistryError
from components.registry.gates import GateResult, evaluate_gates
from components.registry.history import HistoryEvent, read_history, record_event
from components.registry.lock import promotion_lock
from components.tracking import describe_mlflow_error, is_permission_denied

ALIAS_CHAMPION = "champion"
ALIAS_PREVIOUS = "previous-champion"
TAG_DECISION = "medflow.promotion"


@dataclass(frozen=True)
class PromotionDecision:
    """What the policy decided for one version."""

    model_name: str
    version: str
    promoted: bool
    gates: tuple[GateResult, ...]
    champion_before: str | None
    champion_after: str | None
    reason: str = ""
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "promoted": self.promoted,
            "reason": self.reason,
            "champion_before": self.champion_before,
            "champion_after": self.champion_after,
            "decided_at": self.decided_at,
            "gates": [g.to_dict() for g in self.gates],
        }


def alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def current_champion(client: MlflowClient, model_name: str) -> str | None:
    """Version that holds ``champion``, or None."""
    return alias_version(client, model_name, ALIAS_CHAMPION)


def _missing(exc: MlflowException) -> bool:
    return exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def check_model(client: MlflowClient, model_name: str) -> None:
    """Raise a readable RegistryError when the model does not exist (other failures pass through)."""
    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"no registered model {model_name!r} at {client.tracking_uri}") from exc
        raise


def check_version(client: MlflowClient, model_name: str, version: str) -> None:
    """Raise a readable RegistryError when the model or version does not exist."""
    check_model(client, model_name)
    try:
        client.get_model_version(model_name, version)
    except MlflowException as exc:
        if _missing(exc):
            raise RegistryError(f"model {model_name!r} has no version {version!r}") from exc
        raise


def decide_promotion(
    *,
    client: MlflowClient,
    model_name: str,
    version: str,
    report: Mapping,
    rules: Sequence[GateRule],
    compared_with: str | None = None,
    comparisons: Sequence[GateResult] = (),
) -> PromotionDecision:
    """Evaluate the policy for ``version`` and move the aliases only when every rule passes.

    Args:
        client: MLflow client of the registry.
        model_name: registered model.
        version: the challenger.
        report: its report.json.
        rules: absolute rules over the report.
        compared_with: the champion the ``comparisons`` were made against (None: there was none).
        comparisons: non-inferiority results against ``compared_with``.

    The old champion keeps ``previous-champion``. The decision is recorded on the
    version and in the model's history, also when another promotion held the lock.
    """
    check_version(client, model_name, version)
    gates = (*evaluate_gates(report, rules), *comparisons)
    passed = all(g.passed for g in gates)
    reason = "" if passed else "failed: " + "; ".join(g.reason for g in gates if not g.passed)
    before = current_champion(client, model_name)
    promoted = False
    try:
        with promotion_lock(client, model_name, holder=f"version {version}"):
            before = current_champion(client, model_name)
            if passed and before != compared_with:
                reason = (
                    f"the champion changed from {compared_with or 'none'} to {before} while version {version} "
                    "was being compared; promote it again to compare with the new champion"
                )
            elif passed:
                if before != version:
                    if before is not None:
                        client.set_registered_model_alias(model_name, ALIAS_PREVIOUS, before)
                    client.set_registered_model_alias(model_name, ALIAS_CHAMPION, version)
                promoted = True
    except PromotionRefused as exc:
        reason = str(exc)
    except MlflowException as exc:
        if not is_permission_denied(exc):
            raise
        reason = f"{describe_mlflow_error(exc, client.tracking_uri)}: moving {model_name}'s aliases needs EDIT " \
                 "(or MANAGE) permission on the model"
    decision = PromotionDecision(
        model_name=model_name, version=version, promoted=promoted, gates=tuple(gates),
        champion_before=before, champion_after=version if promoted else before, reason=reason,
    )
    try:
        client.set_model_version_tag(model_name, version, TAG_DECISION, json.dumps(decision.to_dict()))
        record_event(
            client, model_name,
            HistoryEvent(kind="promotion", version=version, verdict="promoted" if promoted else "refused",
                         champion_before=before, champion_after=decision.champion_after,
                         gates=[g.to_dict() for g in gates], reason=reason),
        )
    except MlflowException as exc:
        if not is_permission_denied(exc):  # (a user who may move aliases may also write tags)
            raise
        decision = dataclasses.replace(decision, reason=f"{reason}; the decision is not recorded: the user may not "
                                                        "write the model's tags either")
    return decision


def rollback(client: MlflowClient, model_name: str) -> HistoryEvent:
    """Give ``champion`` back to ``previous-champion``; the one before it becomes the new previous.

    Raises:
        RegistryError: unknown model, or no previous champion to return to.
        PromotionRefused: a promotion holds the lock.
    """
    check_model(client, model_name)
    with promotion_lock(client, model_name, holder="rollback"):
        champion = current_champion(client, model_name)
        previous = alias_version(client, model_name, ALIAS_PREVIOUS)
        if previous is None:
            raise RegistryError(f"{model_name} has no {ALIAS_PREVIOUS} to roll back to")
        client.set_registered_model_alias(model_name, ALIAS_CHAMPION, previous)
        # the champion before `previous`, as the history tells, becomes the next fallback
        earlier = next(
            (e.champion_before for e in reversed(read_history(client, model_name))
             if e.champion_after == previous and e.champion_before not in (None, previous, champion)),
            None,
        )
        if earlier is not None:
            client.set_registered_model_alias(model_name, ALIAS_PREVIOUS, earlier)
        else:
            client.delete_registered_model_alias(model_name, ALIAS_PREVIOUS)
        event = HistoryEvent(kind="rollback", version=previous, verdict="rolled back", champion_before=champion,
                             champion_after=previous, reason=f"version {champion} rolled back to {previous}")
        record_event(client, model_name, event)
    return event
