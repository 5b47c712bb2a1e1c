"""The pipeline's steps as plain functions: typed inputs (config, paths, versions,
run ids) and frozen results. ``components/tasks.py`` wraps them as Prefect tasks;
notebooks and tests call them directly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import pandas as pd

from components import lineage, paths
from components.config import RunConfig, SourceFormat, Task
from components.data.ingest import (
    IngestSettings, default_workers, ingest_export, load_manifest, save_state, unchanged_version, write_ingest_report,
)
from components.data.sources import load_salt
from components.data.synthetic import generate_export
from components.data.synthetic_segmentation import generate_segmentation_export
from components.data.versioning import list_versions, push_dataset, read_file_at, read_version, version_dataset
from components.errors import DataValidationError, IngestError, RegistryError
from components.validation.expectations import ValidationReport, validate_manifest

if TYPE_CHECKING:  # the model steps import torch, MONAI and MLflow only when they run
    from components.evaluation.evaluate_model import ModelEvaluation
    from components.registry.promote import PromotionDecision
    from components.registry.register import RegisteredModel
    from components.training.loop import TrainResult


logger = logging.getLogger("medflow.steps")


@dataclass(frozen=True)
class DatasetVersion:
    """An ingested, versioned dataset."""

    name: str
    manifest: Path
    version: str
    n_cases: int
    n_patients: int
    previous_version: str | None = None
    unchanged: bool = False
    push_pending: bool = False


def _source(config: RunConfig, *, generate: bool = True) -> tuple[Path, Path]:
    """Export folder and labels CSV of the configured source; the synthetic demo export (DICOM images for
    classification, NIfTI volumes and masks for segmentation) is generated once under ``.medflow/exports``
    (when ``generate``)."""
    d = config.data
    if d.format is not SourceFormat.SYNTHETIC:
        return Path(d.source), Path(d.labels or Path(d.source) / "labels.csv")
    segmentation = d.task is Task.SEGMENTATION
    knobs = json.dumps([d.n_patients, d.image_size, d.bias, d.seed] + ([d.depth, "segmentation"] if segmentation else []))
    folder = paths.medflow_home() / "exports" / f"{d.name}-{hashlib.sha256(knobs.encode()).hexdigest()[:10]}"
    labels = folder / "labels.csv"
    if generate and not labels.exists():
        if segmentation:
            generate_segmentation_export(folder, n_patients=d.n_patients, image_size=d.image_size, depth=d.depth,
                                         bias=d.bias, seed=d.seed)
        else:
            generate_export(folder, n_patients=d.n_patients, image_size=d.image_size, bias=d.bias, seed=d.seed)
    return folder, labels


def unchanged_data_version(config: RunConfig) -> str | None:
    """The current data version when the configured inputs are unchanged since it was made (hashing only), else None."""
    source, labels = _source(config, generate=False)
    dvc_file = paths.data_root() / f"{config.data.name}.dvc"
    if not dvc_file.exists():
        return None
    version = unchanged_version(
        source=source, labels_csv=labels, dataset_dir=paths.data_root() / config.data.name,
        settings=ingest_settings(config), salt=load_salt(paths.medflow_home() / "secrets" / "pseudonym.key"),
        state_file=paths.medflow_home() / "ingest" / f"{config.data.name}.json",
    )
    return version if version is not None and version == read_version(dvc_file) else None


def ingest_settings(config: RunConfig) -> IngestSettings:
    """The ingest settings a run config implies (the synthetic generator writes DICOM, or NIfTI for segmentation)."""
    d = config.data
    synthetic = "nifti" if d.task is Task.SEGMENTATION else "dicom"
    return IngestSettings(
        fmt=synthetic if d.format is SourceFormat.SYNTHETIC else d.format.value,
        task=d.task.value,
        num_classes=d.num_classes,
        age_bins=tuple(d.age_bins),
        val=d.splits.val,
        test=d.splits.test,
        split_seed=d.splits.seed,
    )


@dataclass(frozen=True)
class PreparedDataset:
    """A dataset folder written (or found unchanged) by ingestion, not yet versioned."""

    name: str
    manifest: Path
    n_cases: int
    n_patients: int
    skipped: int
    previous_version: str | None
    pending_state: Path | None


def prepare_dataset(config: RunConfig) -> PreparedDataset:
    """Convert the configured source into ``data/<name>`` (incremental; no DVC, no network).

    Unchanged inputs do no work: ``pending_state`` is then None and the current
    data version stands.
    """
    d = config.data
    source, labels = _source(config)
    dataset_dir = paths.data_root() / d.name
    dvc_file = dataset_dir.with_name(d.name + ".dvc")
    before = read_version(dvc_file) if dvc_file.exists() else None
    state_file = paths.medflow_home() / "ingest" / f"{d.name}.json"
    report, state = ingest_export(
        source=source,
        labels_csv=labels,
        dataset_dir=dataset_dir,
        settings=ingest_settings(config),
        salt=load_salt(paths.medflow_home() / "secrets" / "pseudonym.key"),
        skip_bad=d.skip_bad,
        workers=d.workers or default_workers(),
        state_file=state_file,
    )
    write_ingest_report(report, paths.medflow_home() / "ingest" / f"{d.name}-report.json")
    pending = None
    if not (report.unchanged and before is not None and state.get("data_version") == before):
        pending = state_file.with_name(f"{d.name}.pending.json")
        save_state(pending, state, data_version="")
    return PreparedDataset(
        name=d.name, manifest=report.manifest, n_cases=report.n_cases, n_patients=report.n_patients,
        skipped=len(report.skipped), previous_version=before, pending_state=pending,
    )


def _push(name: str) -> bool:
    """Push the dataset's current version; on failure keep a marker so that the next run pushes. True when pushed."""
    marker = paths.medflow_home() / "ingest" / f"{name}.push-pending"
    dvc_file = paths.data_root() / f"{name}.dvc"
    try:
        push_dataset(paths.workspace_root(), dvc_file)
    except IngestError as exc:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(read_version(dvc_file) + "\n")
        logger.warning("%s; the data version is committed locally and its push is pending: the next run pushes it", exc)
        return False
    marker.unlink(missing_ok=True)
    return True


def version_prepared(prepared: PreparedDataset, config: RunConfig) -> DatasetVersion:
    """``dvc add`` + commit + push a prepared dataset (the I/O half of ingestion; safe to retry).

    An unreachable remote does not fail ingestion: the version is committed locally,
    the push is marked pending and retried by the next run.
    """
    if prepared.pending_state is None:
        pending = (paths.medflow_home() / "ingest" / f"{prepared.name}.push-pending").exists()
        return DatasetVersion(
            name=prepared.name, manifest=prepared.manifest, version=str(prepared.previous_version),
            n_cases=prepared.n_cases, n_patients=prepared.n_patients,
            previous_version=prepared.previous_version, unchanged=True,
            push_pending=pending and not _push(prepared.name),
        )
    manifest = load_manifest(prepared.manifest)
    meta = {
        "cases": int(len(manifest)), "patients": int(manifest["patient_id"].nunique()),
        **{f"{split}_cases": int(n) for split, n in manifest["split"].value_counts().sort_index().items()},
        "skipped": prepared.skipped,
    }
    version = version_dataset(
        paths.workspace_root(), prepared.manifest.parent,
        remote=config.data.remote or str(paths.dvc_remote_default()), meta=meta,
    )
    state = json.loads(prepared.pending_state.read_text())
    save_state(prepared.pending_state.with_name(f"{prepared.name}.json"), state, data_version=version.version)
    prepared.pending_state.unlink()
    pushed = _push(prepared.name)
    return DatasetVersion(
        name=prepared.name, manifest=prepared.manifest, version=version.version,
        n_cases=prepared.n_cases, n_patients=prepared.n_patients, previous_version=prepared.previous_version,
        unchanged=version.version == prepared.previous_version, push_pending=not pushed,
    )


def ingest_dataset(config: RunConfig) -> DatasetVersion:
    """Ingest the configured source into ``data/<name>``, version it with DVC, push and commit it.

    Unchanged inputs do no work and keep the current data version.
    """
    return version_prepared(prepare_dataset(config), config)


def previous_manifest(dataset: DatasetVersion) -> pd.DataFrame | None:
    """The manifest of the data version before ``dataset.version`` in git history, or None for the first."""
    dvc_file = paths.data_root() / f"{dataset.name}.dvc"
    if not dvc_file.exists():
        return None
    history = [v for v in list_versions(paths.workspace_root(), dvc_file)]
    versions = [v.version for v in history]
    if dataset.version not in versions or versions.index(dataset.version) + 1 >= len(versions):
        return None
    before = history[versions.index(dataset.version) + 1]
    return pd.read_parquet(io.BytesIO(read_file_at(paths.workspace_root(), dvc_file, before.commit, "manifest.parquet")))


def run_validation(manifest: pd.DataFrame, config: RunConfig, *, previous: pd.DataFrame | None = None,
                   docs_dir: Path | None = None) -> ValidationReport:
    """The config's suites on a manifest (drift against ``previous`` when given)."""
    v = config.validation
    return validate_manifest(
        manifest, num_classes=config.data.num_classes, attributes=config.data.attributes,
        min_group_size=v.min_group_size, task=config.data.task.value, consistent_geometry=v.consistent_geometry,
        intensity_ranges=v.intensity_ranges, previous=previous, drift_prevalence=v.drift_prevalence,
        drift_intensity_sd=v.drift_intensity_sd, docs_dir=docs_dir,
    )


def validate_dataset(dataset: DatasetVersion, config: RunConfig) -> Path:
    """Run the expectation suites; keep the report and Data Docs with the data version; raise when any failed.

    The JSON report is ``.medflow/validation/<name>-<version>.json`` and the Data Docs
    site sits beside it in ``<name>-<version>/data_docs/``.

    Raises:
        DataValidationError: naming each failed expectation with example rows.
    """
    path = paths.medflow_home() / "validation" / f"{dataset.name}-{dataset.version}.json"
    report = run_validation(
        load_manifest(dataset.manifest), config, previous=previous_manifest(dataset),
        docs_dir=path.with_suffix("") / "data_docs",
    )
    report.write_json(path)
    for warning in report.warnings:
        logger.warning("data drift against the previous version: %s", warning.describe())
    if not report.success:
        raise DataValidationError(describe_failures(f"data validation failed for {dataset.manifest}", report, path))
    return path


def describe_failures(title: str, report: ValidationReport, path: Path | None) -> str:
    """The failed expectations, one per line, with example rows."""
    lines = "\n".join(f"  - {f.describe()}" for f in report.failures)
    where = f"; report {path}" if path else ""
    docs = f"; Data Docs {report.data_docs}" if report.data_docs else ""
    return f"{title} ({len(report.failures)} expectation(s){where}{docs}):\n{lines}"


def train_model(dataset: DatasetVersion, validation_report: Path, config: RunConfig) -> TrainResult:
    """Train on the dataset and attach its validation report to the run."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415
    from components.training.loop import train_model as train  # noqa: PLC0415
    from components.tracking import use_experiment  # noqa: PLC0415
    if config.train.nproc_per_node > 1 or config.train.nnodes > 1:
        from components.training.distributed import launch_training  # noqa: PLC0415

        result = launch_training(manifest_path=dataset.manifest, data_version=dataset.version, config=config)
    else:
        result = train(manifest_path=dataset.manifest, data_version=dataset.version, config=config)
    use_experiment(config.registry.experiment)
    client = MlflowClient()
    client.log_artifact(result.run_id, str(validation_report), "validation")
    docs = validation_report.with_suffix("") / "data_docs"
    if docs.is_dir():
        client.log_artifacts(result.run_id, str(docs), "validation/data_docs")
    return result


def evaluate_model(run_id: str, dataset: DatasetVersion, config: RunConfig) -> ModelEvaluation:
    """Evaluate the run's checkpoint on the test split (report under ``.medflow/runs/<run_id>``)."""
    from components.evaluation.evaluate_model import evaluate_run  # noqa: PLC0415
    return evaluate_run(
        run_id=run_id, manifest_path=dataset.manifest, config=config,
        out_dir=paths.medflow_home() / "runs" / run_id,
    )


def register(evaluation: ModelEvaluation, dataset: DatasetVersion, config: RunConfig) -> RegisteredModel:
    """Register the evaluated model as the ``challenger``."""
    from components.registry.register import register_model  # noqa: PLC0415
    return register_model(
        run_id=evaluation.run_id, data_version=dataset.version, temperature=evaluation.temperature,
        report_path=evaluation.report, config=config,
    )


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
    import requests  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    from mlflow.tracking import MlflowClient  # noqa: PLC0415
    from components.registry.card import model_card_markdown, write_model_card  # noqa: PLC0415
    from components.tracking import describe_mlflow_error, is_permission_denied  # noqa: PLC0415
    from components.registry.noninferiority import comparison_gates  # noqa: PLC0415
    from components.registry.promote import check_version, current_champion, decide_promotion  # noqa: PLC0415
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
                 if k in (lineage.TAG_DATA_VERSION, lineage.TAG_DATASET, lineage.TAG_CONFIG_HASH, lineage.TAG_CODE_VERSION)}},
        report=report,
        calibration=json.loads(calibration_path.read_text()) if calibration_path.exists() else None,
        manifest=load_manifest(manifest) if manifest is not None and manifest.exists() else None,
        attributes=list(config.data.attributes),
        decision=decision,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_model_card(card, Path(tmp))
        try:
            client.log_artifacts(model_version.run_id, tmp, "model_card")
        except (MlflowException, requests.HTTPError) as exc:  # the artifact proxy answers with plain HTTP errors
            if decision.promoted or not is_permission_denied(exc):
                raise
            logger.warning("the model card of refused version %s is not logged: %s", version,
                           describe_mlflow_error(exc, client.tracking_uri))
    return decision


def promote(model: RegisteredModel, evaluation: ModelEvaluation, dataset: DatasetVersion, config: RunConfig) -> PromotionDecision:
    """Apply the promotion policy to the challenger the pipeline just registered."""
    from components.tracking import use_experiment  # noqa: PLC0415
    use_experiment(config.registry.experiment)
    return promote_version(
        model_name=model.name, version=model.version, config=config,
        evaluation_dir=evaluation.report.parent, manifest=dataset.manifest,
    )


def promote_registered(*, model_name: str, version: str, config: RunConfig) -> PromotionDecision:
    """Promote a version registered earlier: its evaluation comes from its run's artifacts,
    its test set from ``data/<dataset>`` when the workspace holds that data version."""
    import mlflow  # noqa: PLC0415
    from mlflow.exceptions import MlflowException  # noqa: PLC0415
    from mlflow.tracking import MlflowClient  # noqa: PLC0415
    from components.evaluation.evaluate_model import REPORT_DIR  # noqa: PLC0415
    from components.registry.promote import check_version  # noqa: PLC0415
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
