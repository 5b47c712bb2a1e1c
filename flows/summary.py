"""What a retraining run produced, kept under the pipeline's key (every step's config sections, the data
version, medflow's source hash and the tracking store: :func:`components.steps.pipeline_key`).

``medflow run`` with nothing changed since a completed run answers from this record
instead of starting a flow: the same work would be reused from the cache anyway.
Plain Python (no Prefect), so that the check costs a few file reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from components import lineage, paths
from components.config import RunConfig
from components.registry.gates import GateResult
from components.steps import pipeline_key, report_legacy_keys


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
    cached_steps: tuple[str, ...] = ()  # the steps whose results came from the cache
    data_unchanged: bool = False
    finished: str = ""
    champion_change: str = ""  # a reprinted summary: how the champion moved since the run (a rollback, ...)
    study: str = ""  # a study's study.json (its arms' metrics; study.html beside it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PipelineSummary:
        return cls(**{**data, "gates": tuple(GateResult(**g) for g in data["gates"]),
                      "cached_steps": tuple(data.get("cached_steps", ()))})


def _record(config: RunConfig, data_version: str) -> Path:
    return paths.medflow_home() / "runs" / f"summary-{pipeline_key(config, data_version)}.json"


def save_summary(config: RunConfig, summary: PipelineSummary) -> Path:
    """Keep a completed run's summary under ``.medflow/runs/``."""
    path = _record(config, summary.data_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = dataclasses.replace(summary, finished=summary.finished or datetime.now(timezone.utc).isoformat(timespec="seconds"))
    path.write_text(json.dumps(stamped.to_dict(), indent=2, default=str) + "\n")
    return path


def reusable_summary(config: RunConfig) -> PipelineSummary | None:
    """The summary of a completed run with the same data version, config, code and tracking store, if
    the data is unchanged and its model version is still registered; else None (run the flow)."""
    from components.data.step import unchanged_data_version  # noqa: PLC0415

    version = unchanged_data_version(config)
    if version is None:
        return None
    path = _record(config, version)
    report_legacy_keys(path.parent, "summary-*.json", what="run record(s)")
    if not path.exists():
        return None
    summary = PipelineSummary.from_dict(json.loads(path.read_text()))
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(paths.tracking_uri())
    try:
        registered = client.get_model_version(summary.model_name, summary.version)
    except MlflowException:
        return None
    if registered.tags.get(lineage.TAG_DATA_VERSION) != version:
        return None
    try:  # today's champion: a rollback or a promotion may have moved it since
        champion = str(client.get_model_version_by_alias(summary.model_name, "champion").version)
    except MlflowException:
        champion = None
    change = champion_change(client, summary.model_name, since=summary.finished, then=summary.champion, now=champion)
    return dataclasses.replace(summary, reused=True, data_unchanged=True, champion=champion, champion_change=change)


def champion_change(client, model_name: str, *, since: str, then: str | None, now: str | None) -> str:
    """How the champion went from ``then`` (when the run finished, at ``since``) to ``now``: the last
    recorded event that moved it (``medflow rollback on ... made version 1 champion again (was version 3)``),
    or "" when it did not move."""
    from components.registry.history import read_history  # noqa: PLC0415

    if then == now:
        return ""
    moves = [e for e in read_history(client, model_name)
             if e.at >= (since or "") and e.champion_after != e.champion_before and e.champion_after == now]
    if not moves:
        return f"the champion is version {now or 'none'} now (was version {then or 'none'} when this run finished)"
    last = moves[-1]
    when = last.at[:19].replace("T", " ") + " UTC"
    how = "medflow rollback" if last.kind == "rollback" else f"the promotion of version {last.version}"
    return f"{how} on {when} made version {now} champion (was version {last.champion_before or 'none'})"


def study_line(study: Path) -> str:
    """A study's result in one line for the run's summary (its study.json), or "" without one."""
    if not study.is_file():
        return ""
    record = json.loads(study.read_text())
    score = "auc" if "auc" in record["metrics"] else next(iter(record["metrics"]), None)
    if score is None:
        return ""
    fmt = lambda value: "n/a" if value is None else f"{value:.3f}"  # noqa: E731
    page = study.with_name("study.html")
    if record["design"] == "leave_one_site_out":
        sites = ", ".join(f"{a['site']} held out {score} {fmt(a['external'][score]['value'])} (internal "
                          f"{fmt(a['internal'][score]['value'])})" for a in record["arms"])
        return f"leave one site out: {sites}; the run on every site is registered ({page})"
    if record["design"] == "cross_validation":
        folds = ", ".join(fmt(f["metrics"][score]) for f in record["per_fold"])
        mean, sd = record["mean"][score], record["sd"][score]
        spread = "n/a" if mean is None else f"{mean:.3f} ± {sd or 0:.3f}"
        registered = record.get("registered", {}).get("model", "all data")
        registered = "the fold ensemble" if registered == "fold ensemble" else "the run on every fold"
        nested = record.get("nested")
        chose = ""
        if nested:
            by, chosen = nested["select_by"], nested["chosen"]
            picks = ", ".join(str(f["chosen"]) for f in nested["per_fold"])
            settings = ", ".join(f"{k}={v}" for k, v in nested["candidates"][chosen].items())
            chose = (f"nested over {len(nested['candidates'])} candidates by {by}: chosen per outer fold {picks}, "
                     f"nested estimate {score} {fmt(nested['estimate']['metrics'][score]['value'])}; candidate "
                     f"{chosen} ({settings}) goes on: ")
        return (f"{chose}{record['folds']}-fold cross-validation: {score} per fold {folds}; mean {spread}; out-of-fold "
                f"{fmt(record['out_of_fold']['metrics'][score]['value'])}; fold ensemble on test "
                f"{fmt(record['ensemble']['metrics'][score]['value'])}; {registered} is registered ({page})")
    curve = ", ".join(f"{a['fraction']:g} ({a['n_train_patients']} patients) {score} {fmt(a['metrics'][score]['value'])}"
                      for a in record["arms"])
    return f"label fractions: {curve}; the model of the largest is registered ({page})"

