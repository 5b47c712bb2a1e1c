"""The validation step: the config's expectation suites on a data version, with drift against the
version before it (read back from git and DVC at its commit).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from components import paths
from components.config import RunConfig
from components.data.ingest import load_manifest
from components.data.step import DatasetVersion
from components.data.versioning import list_versions, read_file_at
from components.errors import DataValidationError, IngestError
from components.validation.checks import DRIFT_COLUMNS
from components.validation.expectations import ValidationReport, validate_manifest

logger = logging.getLogger("medflow.validation")


def previous_manifest(dataset: DatasetVersion) -> pd.DataFrame | None:
    """The manifest of the data version before ``dataset.version`` in git history (the columns of
    :data:`~components.validation.checks.DRIFT_COLUMNS` it has), or None for the first."""
    dvc_file = paths.data_root() / f"{dataset.name}.dvc"
    if not dvc_file.exists():
        return None
    history = [v for v in list_versions(paths.workspace_root(), dvc_file)]
    versions = [v.version for v in history]
    if dataset.version not in versions or versions.index(dataset.version) + 1 >= len(versions):
        return None
    before = history[versions.index(dataset.version) + 1]
    data = read_file_at(paths.workspace_root(), dvc_file, before.commit, "manifest.parquet")
    try:
        names = pq.read_schema(io.BytesIO(data)).names
        return pd.read_parquet(io.BytesIO(data), columns=[c for c in names if c in DRIFT_COLUMNS])
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise IngestError(f"cannot read {dataset.name}/manifest.parquet of data version {before.version[:12]} "
                          f"(commit {before.commit[:12]}), the version the drift compares with: {exc}") from exc


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
