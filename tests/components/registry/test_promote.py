from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import paths
from components.config import GateRule, Operator
from components.registry.promote import ALIAS_CHAMPION, ALIAS_PREVIOUS, TAG_DECISION, current_champion, decide_promotion

RULES = [GateRule(metric="overall.auc", op=Operator.GE, value=0.8), GateRule(metric="fairness.sex.auc_gap", op=Operator.LE, value=0.1)]
GOOD = {"overall": {"auc": 0.9}, "fairness": {"sex": {"auc_gap": 0.02}}}
UNFAIR = {"overall": {"auc": 0.9}, "fairness": {"sex": {"auc_gap": 0.3}}}


@pytest.fixture
def client(workspace):
    mlflow.set_tracking_uri(paths.tracking_uri())
    client = MlflowClient()
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source="file:///nowhere")
    return client


def _alias(client, alias):
    try:
        return str(client.get_model_version_by_alias("m", alias).version)
    except MlflowException:
        return None


def test_first_passing_model_becomes_champion(client):
    decision = decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    assert decision.promoted and decision.champion_before is None and decision.champion_after == "1"
    assert _alias(client, ALIAS_CHAMPION) == "1" and _alias(client, ALIAS_PREVIOUS) is None


def test_unfair_challenger_is_refused_and_the_champion_stays(client):
    decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    decision = decide_promotion(client=client, model_name="m", version="2", report=UNFAIR, rules=RULES, compared_with="1")
    assert not decision.promoted
    assert [g.metric for g in decision.failed] == ["fairness.sex.auc_gap"]
    assert current_champion(client, "m") == "1" and _alias(client, ALIAS_PREVIOUS) is None
    recorded = json.loads(client.get_model_version("m", "2").tags[TAG_DECISION])
    assert recorded["promoted"] is False and recorded["gates"][1]["value"] == 0.3


def test_a_new_champion_moves_the_old_one_to_previous(client):
    decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    decide_promotion(client=client, model_name="m", version="3", report=GOOD, rules=RULES, compared_with="1")
    assert (_alias(client, ALIAS_CHAMPION), _alias(client, ALIAS_PREVIOUS)) == ("3", "1")
    assert json.loads(client.get_model_version("m", "3").tags[TAG_DECISION])["champion_before"] == "1"


def test_a_champion_that_changed_during_the_comparison_refuses(client):
    decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    decision = decide_promotion(client=client, model_name="m", version="2", report=GOOD, rules=RULES, compared_with=None)
    assert not decision.promoted
    assert decision.reason.startswith("the champion changed from none to 1 while version 2 was being compared")
    assert current_champion(client, "m") == "1"


def test_refused_by_the_lock_is_recorded(client):
    from components.registry.history import read_history
    from components.registry.lock import promotion_lock

    with promotion_lock(client, "m", holder="someone else"):
        decision = decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    assert not decision.promoted and "another promotion of m is in progress" in decision.reason
    assert current_champion(client, "m") is None
    assert read_history(client, "m")[-1].verdict == "refused"


def test_rollback_walks_back_through_the_champions(client):
    from components.registry.history import read_history
    from components.registry.promote import rollback

    decide_promotion(client=client, model_name="m", version="1", report=GOOD, rules=RULES)
    decide_promotion(client=client, model_name="m", version="2", report=GOOD, rules=RULES, compared_with="1")
    decide_promotion(client=client, model_name="m", version="3", report=GOOD, rules=RULES, compared_with="2")
    assert (_alias(client, ALIAS_CHAMPION), _alias(client, ALIAS_PREVIOUS)) == ("3", "2")
    event = rollback(client, "m")
    assert (event.champion_before, event.champion_after) == ("3", "2")
    assert (_alias(client, ALIAS_CHAMPION), _alias(client, ALIAS_PREVIOUS)) == ("2", "1")
    rollback(client, "m")
    assert (_alias(client, ALIAS_CHAMPION), _alias(client, ALIAS_PREVIOUS)) == ("1", None)
    from components.errors import RegistryError

    with pytest.raises(RegistryError) as info:
        rollback(client, "m")
    assert str(info.value) == "m has no previous-champion to roll back to"
    assert [e.kind for e in read_history(client, "m")] == ["promotion"] * 3 + ["rollback"] * 2


def test_unknown_model_or_version_is_a_clear_error_and_changes_nothing(client):
    from components.errors import RegistryError

    with pytest.raises(RegistryError, match=r"model 'm' has no version '9'"):
        decide_promotion(client=client, model_name="m", version="9", report=GOOD, rules=RULES)
    with pytest.raises(RegistryError, match=r"no registered model 'nope' at sqlite:"):
        decide_promotion(client=client, model_name="nope", version="1", report=GOOD, rules=RULES)
    assert current_champion(client, "m") is None
