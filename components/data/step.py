"""The data steps: ingest the configured source into ``data/<name>`` (:func:`prepare_dataset`) and
version it with DVC (:func:`version_prepared`). Plain functions with typed inputs and frozen results;
:mod:`components.steps` declares them and :mod:`components.tasks` wraps them as Prefect tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from components import paths
from components.config import RunConfig, SourceFormat, Task
from components.data.ingest import (
    IngestSettings, default_workers, ingest_export, load_manifest, load_state, save_state, unchanged_version,
    write_ingest_report,
)
from components.data.sources import load_salt
from components.data.synthetic import generate_export
from components.data.synthetic_segmentation import generate_segmentation_export
from components.data.versioning import push_dataset, read_version, version_dataset
from components.errors import IngestError

logger = logging.getLogger("medflow.data")


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

    @property
    def identity(self) -> str:
        """What identifies this dataset in a step key: its DVC data version."""
        return self.version


def check_source(config: RunConfig) -> None:
    """Refuse, before anything is written, a source folder or labels file that is not there.

    Raises:
        IngestError: naming the missing path.
    """
    if config.data.format is SourceFormat.SYNTHETIC:
        return
    source, labels = _source(config, generate=False)
    if not source.is_dir():
        raise IngestError(f"the source folder {source} does not exist (data.source, --source)")
    if not labels.is_file():
        raise IngestError(f"the labels file {labels} does not exist: put labels.csv in {source} or name it with "
                          "data.labels (--labels)")


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
        state_file=_state_file(config.data.name),
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
    state_file = _state_file(d.name)
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
    if not (report.unchanged and before is not None and state.data_version == before):
        pending = state_file.with_name(f"{d.name}.pending.sqlite")
        save_state(pending, state, data_version="")
    return PreparedDataset(
        name=d.name, manifest=report.manifest, n_cases=report.n_cases, n_patients=report.n_patients,
        skipped=len(report.skipped), previous_version=before, pending_state=pending,
    )


def _state_file(name: str) -> Path:
    """Where the incremental state of dataset ``name`` lives (it names source paths: outside the dataset)."""
    return paths.medflow_home() / "ingest" / f"{name}.sqlite"


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
    save_state(_state_file(prepared.name), load_state(prepared.pending_state), data_version=version.version)
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


