"""Move the ``champion`` alias when every gate passes, and record every decision.

The decision (pass or refuse, each rule with its value) is kept as a tag on the
model version, so it survives with the registry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.config import GateRule
from components.registry.gates import GateResult, evaluate_gates

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
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "promoted": self.promoted,
            "champion_before": self.champion_before,
            "champion_after": self.champion_after,
            "decided_at": self.decided_at,
            "gates": [g.to_dict() for g in self.gates],
        }


def current_champion(client: MlflowClient, model_name: str) -> str | None:
    """Version that holds ``champion``, or None."""
    try:
        return str(client.get_model_version_by_alias(model_name, ALIAS_CHAMPION).version)
    except MlflowException:
        return None


def decide_promotion(
    *, client: MlflowClient, model_name: str, version: str, report: Mapping, rules: Sequence[GateRule]
) -> PromotionDecision:
    """Evaluate the policy for ``version``; move the aliases only when every rule passes.

    The old champion keeps ``previous-champion``. The decision is recorded on the version.
    """
    gates = tuple(evaluate_gates(report, rules))
    before = current_champion(client, model_name)
    promoted = all(g.passed for g in gates)
    if promoted and before != version:
        if before is not None:
            client.set_registered_model_alias(model_name, ALIAS_PREVIOUS, before)
        client.set_registered_model_alias(model_name, ALIAS_CHAMPION, version)
    decision = PromotionDecision(
        model_name=model_name,
        version=version,
        promoted=promoted,
        gates=gates,
        champion_before=before,
        champion_after=version if promoted else before,
    )
    client.set_model_version_tag(model_name, version, TAG_DECISION, json.dumps(decision.to_dict()))
    return decision
