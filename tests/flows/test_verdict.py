"""The promotion verdict as Prefect shows it: the flow run's state name and the decision artifact."""

from __future__ import annotations

from components.registry.gates import GateResult
from flows.summary import PipelineSummary

LINK = "http://127.0.0.1:5000/#/experiments/1/runs/abc"


def _summary(promoted: bool) -> PipelineSummary:
    gates = (GateResult("overall.auc", ">=", 0.99, 0.9515, False, "overall.auc >= 0.99 fails (overall.auc = 0.9515)"),
             GateResult("non_inferiority.auc", ">=", -0.02, None, True, "no champion yet: nothing to compare with"))
    return PipelineSummary(dataset="demo", data_version="v1", n_cases=10, n_patients=5, run_id="abc", model_name="m",
                           version="2", metrics={}, gates=gates, promoted=promoted, champion="2" if promoted else "1",
                           reason="" if promoted else "failed: overall.auc >= 0.99 fails (overall.auc = 0.9515)")


def test_a_refusal_shows_its_verdict_reason_gates_and_the_mlflow_run():
    from flows.pipeline import decision_markdown

    text = decision_markdown(_summary(promoted=False), LINK)
    assert "**Refused**: m@champion stays at version 1" in text
    assert "Reason: failed: overall.auc >= 0.99 fails (overall.auc = 0.9515)" in text
    assert "| `overall.auc >= 0.99` | 0.9515 | fail |" in text
    assert "| `non_inferiority.auc >= -0.02` | null | pass |" in text
    assert f"MLflow run [abc]({LINK})" in text and "data version `v1`" in text


def test_the_final_state_is_named_for_the_verdict(workspace, monkeypatch):
    import flows.pipeline as pipeline

    made = []
    monkeypatch.setattr(pipeline, "create_markdown_artifact", lambda **kw: made.append(kw))
    monkeypatch.setattr(pipeline, "mlflow_run_link", lambda run_id: LINK)
    refused = pipeline.verdict_state(_summary(promoted=False))
    assert (refused.name, refused.type.value, refused.result().version) == ("Refused", "COMPLETED", "2")
    assert refused.message.startswith("Refused: m version 2 (failed: overall.auc >= 0.99")
    assert made[0]["key"] == "promotion-decision" and "**Refused**" in made[0]["markdown"]
    promoted = pipeline.verdict_state(_summary(promoted=True), artifact=False)
    assert promoted.name == "Promoted" and len(made) == 1


def test_a_reprinted_summary_says_a_rollback_moved_the_champion_since(workspace, capsys):
    """After `medflow rollback`, the unchanged run's summary must not claim its version is champion."""
    import dataclasses

    from mlflow.tracking import MlflowClient

    from components import paths
    from components.registry.history import HistoryEvent, record_event
    from flows.cli_run import print_summary
    from flows.summary import champion_change

    client = MlflowClient(paths.tracking_uri())
    client.create_registered_model("m")
    record_event(client, "m", HistoryEvent(kind="promotion", version="3", verdict="promoted", champion_before="1",
                                           champion_after="3", at="2026-12-01T10:00:00.000+00:00"))
    record_event(client, "m", HistoryEvent(kind="rollback", version="1", verdict="rolled back", champion_before="3",
                                           champion_after="1", at="2026-12-01T11:30:05.123+00:00"))
    change = champion_change(client, "m", since="2026-12-01T10:00:01+00:00", then="3", now="1")
    assert change == "medflow rollback on 2026-12-01 11:30:05 UTC made version 1 champion (was version 3)"
    assert champion_change(client, "m", since="2026-12-01T10:00:01+00:00", then="1", now="1") == ""

    run = dataclasses.replace(_summary(promoted=True), version="3", champion="1", reused=True,
                              finished="2026-12-01T10:00:01+00:00", champion_change=change)
    print_summary(run)
    out = " ".join(capsys.readouterr().out.split())
    assert "Promoted when it ran: version 3 became m@champion" in out
    assert ("Since then: medflow rollback on 2026-12-01 11:30:05 UTC made version 1 champion (was version 3); "
            "m@champion is version 1") in out
    assert "Promoted: m@champion is version 1" not in out


def test_the_summary_in_a_log_keeps_its_lines_whole_and_says_each_rule_once(capsys):
    """Piped or logged (no terminal), the summary does not wrap at 80 columns and a failed rule is not
    repeated in its verdict."""
    import dataclasses

    from flows.cli_run import print_summary

    metrics = {"auc": 0.9515, "accuracy": 0.913, "ece": 0.0554, "brier": 0.0801, "temperature": 0.962}
    print_summary(dataclasses.replace(_summary(promoted=False), metrics=metrics))
    lines = capsys.readouterr().out.splitlines()
    assert "Test metrics auc 0.952  accuracy 0.913  ece 0.055  brier 0.080  temperature 0.962" in [
        line.rstrip() for line in lines]
    row = next(line for line in lines if "overall.auc >= 0.99" in line)
    assert row.count("overall.auc") == 1 and "fail" in row
    assert not any("━" in line and len(line) > 200 for line in lines)  # the table is not stretched to the width
