"""The retraining flow: ingest -> version -> validate -> train -> evaluate -> register -> promote.

It only sequences the steps of the table (:mod:`components.steps`). Each step runs
as its task in this flow's process unless the config places it on a work pool
(``placement``); a placed step runs as its own flow's deployment
(``medflow-<step>/<pool>``, see ``flows/steps.py`` and ``infra/prefect.yaml``).

A study (``study.label_fractions``: one arm per fraction; ``study.leave_one_site_out``: one arm per
site held out, ``study.folds``: one arm per fold, each beside the plain run) trains and evaluates its arms in the subflow ``medflow-study``: the arms are Prefect tasks submitted at once to Prefect's Dask task runner (a local
cluster of ``study.parallel`` worker processes, one per core by default, or the Dask cluster at
``study.dask_address``; with ``study.parallel=1`` one after another in this flow's own thread), each arm's train and evaluate steps cached on their own keys, so a study
killed half-way and run again trains only the arms that had not finished. The largest fraction's
model (the plain run's, leaving sites out; the folds joined into one model, for k-fold cross-validation) is
registered and gated as a plain run's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import State, flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner
from prefect.states import Completed

from components import paths, tasks
from components.config import RunConfig, StudyConfig, load_config
from components.steps import get_step
from components.errors import PlacedStepFailed
from components.evaluation.declarations import METRICS
from flows.summary import PipelineSummary


LOCK_WAIT_S = 3600


def run_placed(step: str, pool: str, parameters: dict):
    """Run step ``step`` as deployment ``medflow-<step>/<pool>``, wait for it, return its result.

    Raises:
        PlacedStepFailed: the deployment does not exist, or its run did not complete.
    """
    from prefect.deployments import run_deployment  # noqa: PLC0415
    from prefect.exceptions import ObjectNotFound  # noqa: PLC0415

    name = f"medflow-{step}/{pool}"
    try:
        flow_run = run_deployment(name=name, parameters=parameters, timeout=None)
    except ObjectNotFound as exc:
        raise PlacedStepFailed(
            f"step {step} is placed on work pool {pool}, but there is no deployment {name}: "
            "register them with `prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml`"
        ) from exc
    state = flow_run.state
    if state is None or not state.is_completed():
        status = state.name if state else "unknown"
        raise PlacedStepFailed(f"step {step} on work pool {pool} ended {status}: {state.message if state else ''}".rstrip(": "))
    return state.result()


def run_step(config: RunConfig, name: str, /, *, force: bool = False, **inputs):
    """Run one step of the table with its inputs: in this process (its task, cached on its key) or, when
    the config places it on a work pool, as that pool's deployment. Returns (result, reused from cache)."""
    step = get_step(name)
    pool = config.placement.get(name)
    if pool is not None:
        extra = {"force": force} if step.cached else {}
        return run_placed(name, pool, {"workspace": str(paths.workspace_root()), **inputs, "config": config, **extra}), False
    task = tasks.TASKS[name].with_options(**({"refresh_cache": True} if force and step.cached else {}))
    state = task(**inputs, config=config, return_state=True)
    return state.result(), state.name == "Cached"


class StepRunner:
    """Runs a flow's steps of the table (:func:`run_step`) with one config and ``force``, keeping the names of
    those reused from the cache in ``cached``."""

    def __init__(self, config: RunConfig, *, force: bool = False) -> None:
        self.config, self.force, self.cached = config, force, []

    def __call__(self, name: str, **inputs):
        result, from_cache = run_step(self.config, name, force=self.force, **inputs)
        self.cached.extend([name] if from_cache else [])
        return result


SUMMARY_METRICS = tuple(m.name for m in METRICS if m.summary)


@task(name="medflow-study-arm", cache_policy=NO_CACHE)
def study_arm(config: RunConfig, dataset, validation_report: Path, workspace: str, threads: int = 0) -> tuple:
    """One arm of a study, in the workspace (a Dask worker may start elsewhere: it needs shared storage): its
    train and evaluate steps (each cached on its own key, or placed on its pool). ``threads``: torch's threads
    in this worker (the local cluster shares the cores among its arms; 0 leaves torch's default)."""
    from flows.steps import enter_workspace  # noqa: PLC0415

    if threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
    enter_workspace(workspace)
    return train_and_evaluate(config, dataset, validation_report)


def train_and_evaluate(config: RunConfig, dataset, validation_report: Path) -> tuple:
    """One arm's train and evaluate steps, each cached on its own key (or placed on its pool): (trained,
    evaluation)."""
    trained, _ = run_step(config, "train", dataset=dataset, validation_report=validation_report)
    evaluation, _ = run_step(config, "evaluate", run_id=trained.run_id, dataset=dataset)
    return trained, evaluation


@flow(name="medflow-study")
def study_arms(arms: list[RunConfig], dataset, validation_report: Path, threads: int = 0,
               concurrent: bool = True) -> list[tuple]:
    """(trained, evaluation) per arm, in the arms' order: every arm at once on this flow's task runner, or (not
    ``concurrent``) one after another in this thread, as the steps' tasks of this flow."""
    if not concurrent:
        return [train_and_evaluate(arm, dataset, validation_report) for arm in arms]
    workspace = str(paths.workspace_root())
    futures = [study_arm.submit(arm, dataset, validation_report, workspace, threads) for arm in arms]
    return [future.result() for future in futures]


def _prefect_api() -> dict[str, str]:
    """The Prefect API this flow talks to (a server, or the ephemeral one this process started), for the local
    cluster's workers: without it each worker starts an ephemeral server of its own, some 10 s apiece."""
    from prefect.client.orchestration import get_client  # noqa: PLC0415

    with get_client(sync_client=True) as client:
        return {"PREFECT_API_URL": str(client.api_url).rstrip("/")}


def study_runner(study: StudyConfig, n_arms: int) -> tuple[TaskRunner | None, int]:
    """The task runner of a study's arms and torch's threads in each arm; (None, 0) to run them one after another
    in the flow's own thread.

    At most one arm at a time (``study.parallel=1``, a one-core machine, a single arm) the arms run in this
    process, whose imports are paid, and in its thread: a local Dask worker would spend some 10 s importing torch,
    MONAI, MLflow and Prefect before its first arm, and torch runs slower in a second thread of a process whose
    first has used its OpenMP threads (they spin on the cores the second thread's threads need). Two or more run
    at once on Dask: a local cluster of that many worker processes (the cores shared among them), or the cluster
    at ``study.dask_address``.
    """
    from prefect_dask import DaskTaskRunner  # noqa: PLC0415 (studies only)

    from components.data.ingest import default_workers  # noqa: PLC0415

    if study.dask_address:
        return DaskTaskRunner(address=study.dask_address), 0
    workers = min(n_arms, study.parallel or default_workers())
    if workers <= 1:
        return None, 0
    # the local cluster's nannies warn when a finished worker takes over 4 s to exit (torch's threads): not news
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": _prefect_api()}), \
        max(1, default_workers() // workers)  # the cores, shared


def run_study(config: RunConfig, dataset, validation_report: Path) -> tuple:
    """Train and evaluate a study's arms (label fractions, leaving one site out, or k-fold cross-validation) on
    the runner :func:`study_runner` chooses, then :func:`conclude_study`: the registered arm's (trained,
    evaluation), and the folder holding study.json and study.html."""
    from components.tracking import use_experiment  # noqa: PLC0415

    labelled = plan_study(config, dataset)
    use_experiment(config.registry.experiment)  # the store and experiment exist before the arms race to make them
    runner, threads = study_runner(config.study, len(labelled))
    arms = study_arms if runner is None else study_arms.with_options(task_runner=runner)
    results = arms([c for _, c in labelled], dataset, validation_report, threads, concurrent=runner is not None)
    return conclude_study(config, dataset, labelled, results)


def plan_study(config: RunConfig, dataset) -> list[tuple]:
    """The study's arms as (label, arm config): for leaving one site out and cross-validation the plain run
    first (the one registered, unless the folds are joined); for label fractions the smallest fraction first."""
    from components.data.study import fold_arms, fraction_arms, nested_arms, site_arms  # noqa: PLC0415
    from components.evaluation.study import check_select_by  # noqa: PLC0415

    if config.study.leave_one_site_out:
        return site_arms(config, dataset.manifest)
    if config.study.candidates:  # nested cross-validation: every candidate's plain, fold and inner arms
        check_select_by(config.study.select_by, SUMMARY_METRICS)
        return nested_arms(config, dataset.manifest)
    if config.study.folds:
        return fold_arms(config, dataset.manifest)
    return fraction_arms(config)


def conclude_study(config: RunConfig, dataset, labelled: list[tuple], results: list[tuple]) -> tuple:
    """From each arm's (trained, evaluation), in :func:`plan_study`'s order: the study's figures (and, for
    cross-validation, the folds joined into one model), ``study.json`` and ``study.html`` logged as the study's
    MLflow run; the registered arm's (trained, evaluation), and the folder holding study.json and study.html."""
    from components.data.study import study_manifest, training_patients  # noqa: PLC0415
    from components.evaluation.study import Arm, fraction_study, site_study  # noqa: PLC0415

    nested = None
    if config.study.candidates:  # the candidate best over the outer folds goes on as a plain k-fold study
        nested, config, labelled, results = _nested_cross_validation(config, dataset, labelled, results)
    registered = 0 if config.study.leave_one_site_out or config.study.folds else len(labelled) - 1
    arms = [Arm(fraction=arm.study.train_fraction, run_id=trained.run_id,
                n_train_patients=training_patients(study_manifest(dataset.manifest, arm.study)),
                report=json.loads(Path(evaluation.report).read_text()))
            for (_, arm), (trained, evaluation) in zip(labelled, results)]
    if config.study.leave_one_site_out:
        study = site_study(arms[0], arms[1:], [site for site, _ in labelled[1:]])
    elif config.study.folds:
        study = _cross_validation(config, dataset, arms, [evaluation for _, evaluation in results])
        if nested is not None:
            study["nested"] = nested
        joined = _fold_ensemble(config, dataset, results[1:], study)
        if joined is not None:  # the folds as one model: the one registered and gated
            results, registered = [*results, joined], len(results)
    else:
        study = fraction_study(arms)
    study_run = log_study(config, study)
    return (*results[registered], paths.medflow_home() / "studies" / study_run)


def _nested_cross_validation(config: RunConfig, dataset, labelled: list[tuple], results: list[tuple]) -> tuple:
    """Nested cross-validation's figures from :func:`components.data.study.nested_arms`' arms, and the chosen
    candidate's k-fold study as :func:`conclude_study` takes one: (nested, config, labelled, results), the config
    the candidate's (its folds, no candidates)."""
    import pandas as pd  # noqa: PLC0415

    from components.config import with_candidate  # noqa: PLC0415
    from components.data.ingest import load_manifest  # noqa: PLC0415
    from components.evaluation.declarations import report_metrics  # noqa: PLC0415
    from components.evaluation.study import nested_cv  # noqa: PLC0415
    from components.inference.classification import VAL_PREDICTIONS  # noqa: PLC0415

    by_label = {label: (arm, result) for (label, arm), result in zip(labelled, results)}
    val = lambda label: pd.read_parquet(Path(by_label[label][1][1].report).parent / VAL_PREDICTIONS)  # noqa: E731
    study, ev = config.study, config.evaluate
    k, candidates = study.folds, range(len(study.candidates))
    plain_report = json.loads(Path(by_label["plain", 0][1][1].report).read_text())
    nested = nested_cv(
        study.candidates, [[val(("fold", c, f)) for f in range(k)] for c in candidates],
        {(c, f, j): val(("inner", c, f, j)) for c in candidates for f in range(k) for j in range(k) if j != f},
        load_manifest(dataset.manifest), select_by=study.select_by,
        names=[m.name for m in report_metrics(plain_report) if m.summary], threshold=ev.threshold,
        n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size,
        target_specificity=ev.target_specificity, ordinal=config.data.ordinal)
    chosen = nested["chosen"]
    nested["runs"] = [trained.run_id for label, (_, (trained, _)) in by_label.items() if label[1] != chosen
                      or label[0] == "inner"]  # nested under the study's run too
    kept = [("plain", chosen), *(("fold", chosen, f) for f in range(k))]
    return (nested, with_candidate(config, study.candidates[chosen], where=f"study.candidates[{chosen}]"),
            [(None if label[0] == "plain" else label[2], by_label[label][0]) for label in kept],
            [by_label[label][1] for label in kept])


def _fold_ensemble(config: RunConfig, dataset, folds: list[tuple], study: dict) -> tuple | None:
    """The folds joined into one model and judged on the test split, as (trained, evaluation) of a run; None
    (and the reason in the study) when the folds cannot be joined: the plain run on every fold is registered."""
    from components.data.study import study_manifest  # noqa: PLC0415
    from components.errors import EvaluationError  # noqa: PLC0415
    from components.inference.ensemble import evaluate_fold_ensemble  # noqa: PLC0415
    from components.training.loop import TrainResult  # noqa: PLC0415

    try:
        evaluation = evaluate_fold_ensemble(
            fold_runs=[trained.run_id for trained, _ in folds], temperatures=[e.temperature for _, e in folds],
            manifest_path=study_manifest(dataset.manifest, config.study), config=config, data_version=dataset.version)
    except EvaluationError as exc:
        study["registered"] = {"model": "all data", "why": f"the folds are not joined: {exc}"}
        return None
    study["ensemble"]["run_id"] = evaluation.run_id
    study["registered"] = {"model": "fold ensemble", "run_id": evaluation.run_id}
    return TrainResult(run_id=evaluation.run_id, best_epoch=0, best_metric=None, epochs=0), evaluation


def _cross_validation(config: RunConfig, dataset, arms: list, evaluations: list) -> dict:
    """The cross-validation study from each fold's val and test predictions (beside its report.json)."""
    import pandas as pd  # noqa: PLC0415

    from components.data.ingest import load_manifest  # noqa: PLC0415
    from components.evaluation.study import cv_study  # noqa: PLC0415
    from components.inference.classification import VAL_PREDICTIONS  # noqa: PLC0415

    folders = [Path(evaluation.report).parent for evaluation in evaluations[1:]]
    ev = config.evaluate
    manifest = load_manifest(dataset.manifest)
    return cv_study(arms[0], arms[1:], [pd.read_parquet(f / VAL_PREDICTIONS) for f in folders],
                    [pd.read_parquet(f / "predictions.parquet") for f in folders], manifest,
                    threshold=ev.threshold, n_bootstrap=ev.n_bootstrap, seed=ev.seed, min_group_size=ev.min_group_size,
                    attributes=[a for a in config.data.attributes if a in manifest.columns],
                    target_specificity=ev.target_specificity, ordinal=config.data.ordinal)


def arms_param(runs: list[str]) -> str:
    """The study run's ``arms`` param: the arms' run ids, or their count where the ids would pass MLflow's limit
    on a param's length (a nested study of some 170 arms); study.json lists them either way."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH  # noqa: PLC0415

    joined = ", ".join(runs)
    return joined if len(joined) <= MAX_PARAM_VAL_LENGTH else f"{len(runs)} runs (their ids are in study.json)"


def log_study(config: RunConfig, study: dict) -> str:
    """The study's MLflow run in the run's experiment: each arm's metrics (``<metric>.fraction_<f>``; or
    ``<metric>.site_<site>`` on the held-out site and ``<metric>.delta_site_<site>``), the arms' runs, ``study.json`` and ``study.html``; each arm's training run is nested under it unless it already
    has a parent (a cached arm shared with an earlier study). Returns the run id."""
    import tempfile  # noqa: PLC0415

    import mlflow  # noqa: PLC0415

    from components.evaluation.study import CROSS_VALIDATION, LEAVE_ONE_SITE_OUT, write_study_html  # noqa: PLC0415
    from components.tracking import use_experiment  # noqa: PLC0415

    experiment_id = use_experiment(config.registry.experiment)
    client = mlflow.MlflowClient()
    runs = [a["run_id"] for a in study.get("arms", [])]
    joined: list[str] = []
    if study["design"] == LEAVE_ONE_SITE_OUT:
        arms = ", ".join(a["site"] for a in study["arms"])
        name, params = f"study: leave one site out ({arms})", {"sites": arms}
        metrics = {f"{m}.site_{a['site']}": a["external"][m]["value"] for a in study["arms"] for m in study["metrics"]}
        metrics |= {f"{m}.delta_site_{a['site']}": a["delta"][m]["value"] for a in study["arms"] for m in study["metrics"]}
        runs.append(study["all_sites"]["run_id"])
    elif study["design"] == CROSS_VALIDATION:
        runs = [f["run_id"] for f in study["per_fold"]] + [study["all_data"]["run_id"]]
        joined = [study["ensemble"]["run_id"]] if study["ensemble"].get("run_id") else []  # nested, not an arm
        name, params = f"study: {study['folds']}-fold cross-validation", {"folds": study["folds"]}
        nested = study.get("nested")
        if nested:
            runs += nested["runs"]
            name = f"study: nested {study['folds']}-fold cross-validation of {len(nested['candidates'])} candidates"
            params |= {"candidates": json.dumps(nested["candidates"]), "select_by": nested["select_by"],
                       "chosen": nested["chosen"]}
        metrics = {f"{m}.fold_{f['fold']}": f["metrics"][m] for f in study["per_fold"] for m in study["metrics"]}
        metrics |= {f"{m}.cv_mean": study["mean"][m] for m in study["metrics"]}
        metrics |= {f"{m}.cv_sd": study["sd"][m] for m in study["metrics"]}
        metrics |= {f"{m}.out_of_fold": study["out_of_fold"]["metrics"][m]["value"] for m in study["metrics"]}
        metrics |= {f"{m}.fold_ensemble": study["ensemble"]["metrics"][m]["value"] for m in study["metrics"]}
        if nested:
            metrics |= {f"{m}.nested": nested["estimate"]["metrics"][m]["value"] for m in study["metrics"]}
    else:
        arms = ", ".join(f"{a['fraction']:g}" for a in study["arms"])
        name, params = f"study: label fractions {arms}", {"fractions": arms}
        metrics = {f"{m}.fraction_{a['fraction']:g}": a["metrics"][m]["value"] for a in study["arms"]
                   for m in study["metrics"]}
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={"medflow.study": study["design"]}) as run:
        mlflow.log_params({"design": study["design"], **params, "arms": arms_param(runs), "n_arms": len(runs)})
        mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "study.json").write_text(json.dumps(study, indent=2) + "\n")
            write_study_html(study, Path(tmp) / "study.html")
            mlflow.log_artifacts(tmp)
            out = paths.medflow_home() / "studies" / run.info.run_id
            out.mkdir(parents=True, exist_ok=True)
            for name in ("study.json", "study.html"):
                (out / name).write_bytes((Path(tmp) / name).read_bytes())
        for child in runs + joined:
            if "mlflow.parentRunId" not in client.get_run(child).data.tags:
                client.set_tag(child, "mlflow.parentRunId", run.info.run_id)
    create_link_artifact(key="study", link=mlflow_run_link(run.info.run_id), link_text=f"study {run.info.run_id}",
                         description="The study's MLflow run: each arm's metrics, study.json and study.html")
    return run.info.run_id


@flow(name="medflow-retrain")
def retrain(config: RunConfig, force: bool = False) -> PipelineSummary:
    """Retrain, evaluate and (if every gate passes) promote a model on the configured data.

    Each cached step is reused when its key (the config sections it reads, its inputs, medflow's
    source) is unchanged: a new promotion rule re-runs promotion alone. ``force`` runs them again.
    """
    step = StepRunner(config, force=force)
    cached = step.cached
    prepared = step("ingest")
    dataset = step("version", prepared=prepared)
    report = step("validate", dataset=dataset)
    study_dir = None
    studied = bool(config.study.label_fractions or config.study.leave_one_site_out
                   or (config.study.folds and config.study.fold is None))
    if studied:
        trained, evaluation, study_dir = run_study(config, dataset, report)
    else:
        trained = step("train", dataset=dataset, validation_report=report)
    create_link_artifact(key="mlflow-run", link=mlflow_run_link(trained.run_id), link_text=f"MLflow run {trained.run_id}",
                         description="The training run in MLflow: its metrics, evaluation report and model card")
    if not studied:
        evaluation = step("evaluate", run_id=trained.run_id, dataset=dataset)
    model = step("register", evaluation=evaluation, dataset=dataset)
    decision = step("promote", model=model, evaluation=evaluation, dataset=dataset)
    overall = json.loads(Path(evaluation.report).read_text())["overall"]
    summary = PipelineSummary(
        dataset=dataset.name,
        data_version=dataset.version,
        n_cases=dataset.n_cases,
        n_patients=dataset.n_patients,
        run_id=trained.run_id,
        model_name=model.name,
        version=model.version,
        metrics={k: overall.get(k) for k in SUMMARY_METRICS if k in overall} | {"temperature": evaluation.temperature},
        gates=decision.gates,
        promoted=decision.promoted,
        champion=decision.champion_after,
        reason=decision.reason,
        reused="train" in cached,
        cached_steps=tuple(cached),
        data_unchanged=dataset.unchanged,
        study=str(study_dir / "study.json") if study_dir else "",
    )
    return verdict_state(summary)


def mlflow_run_link(run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server, or on `medflow ui` (127.0.0.1:5000) for the
    embedded store."""
    import mlflow  # noqa: PLC0415

    uri = paths.tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    mlflow.set_tracking_uri(uri)
    return f"{base}/#/experiments/{mlflow.get_run(run_id).info.experiment_id}/runs/{run_id}"


def decision_markdown(summary: PipelineSummary, link: str) -> str:
    """The promotion decision as the Prefect flow run's artifact: verdict, reason, each gate, the MLflow run."""
    verdict = (f"**Promoted**: {summary.model_name}@champion is version {summary.champion}" if summary.promoted
               else f"**Refused**: {summary.model_name}@champion stays at "
                    f"{'version ' + summary.champion if summary.champion else 'no version'}")
    rows = "\n".join(f"| `{g.metric} {g.op} {g.threshold:g}` | {'null' if g.value is None else f'{g.value:.4f}'} "
                     f"| {'pass' if g.passed else 'fail'} |" for g in summary.gates)
    reason = f"\n\nReason: {summary.reason}" if summary.reason else ""
    return (f"# Promotion of {summary.model_name} version {summary.version}\n\n{verdict}{reason}\n\n"
            f"| rule | value | verdict |\n|---|---|---|\n{rows}\n\n"
            f"MLflow run [{summary.run_id}]({link}) (for the embedded store, open it with `medflow ui`); "
            f"data version `{summary.data_version}`.\n")


def verdict_state(summary: PipelineSummary, *, artifact: bool = True) -> State:
    """The flow run's final state, named for the verdict (Promoted or Refused), and (``artifact``) the gate
    table as a Prefect artifact (key ``promotion-decision``), so the Prefect UI shows why, not only green."""
    if artifact:
        create_markdown_artifact(key="promotion-decision", description=f"{summary.model_name} version {summary.version}",
                                 markdown=decision_markdown(summary, mlflow_run_link(summary.run_id)))
    name = "Promoted" if summary.promoted else "Refused"
    return Completed(data=summary, name=name, message=f"{name}: {summary.model_name} version {summary.version}"
                     + (f" ({summary.reason})" if summary.reason else ""))


@flow(name="medflow-retrain-workspace")
def retrain_workspace(
    workspace: str = ".", config: str = "medflow.yaml", overrides: list[str] | None = None, force: bool = False
) -> PipelineSummary:
    """The deployments' entry point: retrain in ``workspace`` with its run config file.

    Args:
        workspace: folder holding ``medflow.yaml``, ``data/`` and ``.medflow/`` (shared storage for workers).
        config: run config, relative to the workspace.
        overrides: ``key=value`` overrides, as ``--set`` takes them.
        force: retrain even when data, config and code are unchanged.
    """
    from components.workspace import workspace_lock  # noqa: PLC0415
    from flows.preflight import check_run  # noqa: PLC0415
    from flows.steps import enter_workspace  # noqa: PLC0415

    enter_workspace(workspace)
    cfg = check_run(load_config(Path(config), overrides=overrides or []))
    with workspace_lock("retrain (deployment)", wait_s=LOCK_WAIT_S):  # a scheduled run waits for a manual one
        summary = retrain(cfg, force=force)
    return verdict_state(summary, artifact=False)  # named as the retraining flow's; its run holds the artifact
