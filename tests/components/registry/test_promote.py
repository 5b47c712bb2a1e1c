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
