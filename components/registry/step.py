"""The registry steps: register an evaluated model as the challenger, and apply the promotion
policy to it (or to any version registered earlier), logging its model card."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import lineage, paths
from components.config import RunConfig
from components.data.ingest import load_manifest
from components.data.step import DatasetVersion
from components.data.versioning import read_version
from components.errors import RegistryError
from components.evaluation.declarations import report_metrics
from components.inference.results import REPORT_DIR, ModelEvaluation
from components.registry.card import card_columns, model_card_markdown, write_model_card
from components.registry.noninferiority import comparison_gates
from components.registry.promote import PromotionDecision, check_version, current_champion, decide_promotion
from components.registry.register import RegisteredModel, register_model
from components.steps import get_step
from components.tracking import describe_mlflow_error, is_permission_denied, use_experiment

logger = logging.getLogger("medflow.registry")
DESCRIPTION_LIMIT = 4000  # MLflow's SQL stores keep 5000 characters of a version's description


def register_challenger(evaluation: ModelEvaluation, dataset: DatasetVersion, config: RunConfig) -> RegisteredModel:
    """The registration step: register the evaluated model as the ``challenger``, tagged with this step's key."""
    model = register_model(
        run_id=evaluation.run_id, data_version=dataset.version, temperature=evaluation.temperature,
        report_path=evaluation.report, config=config,
    )
    key = get_step("register").key(config, {"evaluation": evaluation, "dataset": dataset})
    MlflowClient().set_model_version_tag(model.name, model.version, lineage.step_tag("register"), key)
    return model


def promote_version(
    *,
    model_name: str,
    version: str,
    config: RunConfig,
    evaluation_dir: Path,
    manifest: Path | None,
) -> PromotionDecision:
    """Apply the promotion policy to a registered version and log its model card.

    Args:
        model_name: registered model.
        version: the challenger.
        config: the policy (``promotion``) and bootstrap settings (``evaluate``).
        evaluation_dir: the version's ``report.json``, ``predictions.parquet`` and ``calibration.json``.
        manifest: the test set's manifest, for the champion to predict the same cases (None: unavailable).
    """
    client = MlflowClient()
    check_version(client, model_name, version)
    champion = current_champion(client, model_name)
    report = json.loads((evaluation_dir / "report.json").read_text())
    comparisons = comparison_gates(
        rules=config.promotion.non_inferiority,
        champion=champion,
        challenger_version=version,
        predictions=evaluation_dir / "predictions.parquet",
        manifest=manifest,
        model_uri=f"models:/{model_name}/{champion}" if champion else None,
        n_resamples=config.evaluate.n_bootstrap or 1000,
        seed=config.evaluate.seed,
        threshold=config.evaluate.threshold,
    )
    decision = decide_promotion(
        client=client, model_name=model_name, version=version, report=report,
        rules=config.promotion.rules, compared_with=champion, comparisons=comparisons,
    )
    model_version = client.get_model_version(model_name, version)
    calibration_path = evaluation_dir / "calibration.json"
    card = model_card_markdown(
        model_name=model_name,
        version=version,
        lineage={"run": model_version.run_id, **{k: v for k, v in model_version.tags.items()
                 if k in (lineage.TAG_DATA_VERSION, lineage.TAG_DATASET, lineage.TAG_CONFIG_HASH, lineage.TAG_CODE_VERSION,
                          lineage.TAG_CODE_HASH) or k.startswith(lineage.TAG_BACKBONE)}},
        report=report,
        calibration=json.loads(calibration_path.read_text()) if calibration_path.exists() else None,
        manifest=(load_manifest(manifest, columns=card_columns(config.data.attributes))
                  if manifest is not None and manifest.exists() else None),
        attributes=list(config.data.attributes),
        decision=decision,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_model_card(card, Path(tmp))
        try:
            client.log_artifacts(model_version.run_id, tmp, "model_card")
            # the registry's own description field, which the MLflow UI shows on the version's page
            client.update_model_version(model_name, version, description=version_description(
                report=report, decision=decision, data=model_version.tags, run_id=model_version.run_id))
        except (MlflowException, requests.HTTPError) as exc:  # the artifact proxy answers with plain HTTP errors
            if decision.promoted or not is_permission_denied(exc):
                raise
            logger.warning("the model card of refused version %s is not logged: %s", version,
                           describe_mlflow_error(exc, client.tracking_uri))
    return decision


def version_description(*, report: dict, decision: PromotionDecision, data: dict, run_id: str) -> str:
    """A model version's description: what it is, its key test figures with intervals, and the decision
    (the model card, too long for the registry's field, is an artifact of the run)."""
    overall, ci = report["overall"], report.get("ci95", {})
    figures = []
    for m in report_metrics(report):
        if m.tagged and overall.get(m.name) is not None:
            interval = ci.get(m.name)
            figures.append(f"{m.title} {overall[m.name]:.3f}"
                           + (f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
    verdict = "Promoted to champion" if decision.promoted else "Refused"
    text = (f"{report['task'].capitalize()} model trained by medflow on {data.get(lineage.TAG_DATASET, '?')} "
            f"(data version {data.get(lineage.TAG_DATA_VERSION, '?')[:12]}). Test split, {report['n']} images of "
            f"{report['n_patients']} patients: {'; '.join(figures)}. {verdict} on {decision.decided_at}"
            + (f": {decision.reason}" if decision.reason else "")
            + f". Model card: artifact model_card/model_card.md of run {run_id}.")
    return text if len(text) <= DESCRIPTION_LIMIT else text[:DESCRIPTION_LIMIT - 1] + "…"


def promote_challenger(model: RegisteredModel, evaluation: ModelEvaluation, dataset: DatasetVersion,
                       config: RunConfig) -> PromotionDecision:
    """The promotion step: apply the promotion policy to the challenger the pipeline just registered."""
    use_experiment(config.registry.experiment)
    return promote_version(
        model_name=model.name, version=model.version, config=config,
        evaluation_dir=evaluation.report.parent, manifest=dataset.manifest,
    )


def promote_registered(*, model_name: str, version: str, config: RunConfig) -> PromotionDecision:
    """Promote a version registered earlier: its evaluation comes from its run's artifacts,
    its test set from ``data/<dataset>`` when the workspace holds that data version."""
    mlflow.set_tracking_uri(paths.tracking_uri())
    client = MlflowClient()
    check_version(client, model_name, version)
    model_version = client.get_model_version(model_name, version)
    dataset = model_version.tags.get(lineage.TAG_DATASET, "")
    dvc_file = paths.data_root() / f"{dataset}.dvc"
    manifest = paths.data_root() / dataset / "manifest.parquet"
    same_data = dataset and dvc_file.exists() and read_version(dvc_file) == model_version.tags.get(lineage.TAG_DATA_VERSION)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=model_version.run_id, artifact_path=REPORT_DIR, dst_path=tmp))
        except MlflowException as exc:
            raise RegistryError(f"version {version} of {model_name} has no evaluation in run {model_version.run_id}") from exc
        return promote_version(
            model_name=model_name, version=version, config=config,
            evaluation_dir=folder, manifest=manifest if same_data else None,
        )
