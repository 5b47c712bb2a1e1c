"""Ingest an export (DICOM, NIfTI or PNG + a labels CSV) into a dataset folder.

The dataset is built in a staging folder beside its target and moved into place
only when every case converted (or, with ``skip_bad``, every bad case was
recorded), so a failed ingest leaves nothing half-written. Images become NIfTI
files whose voxel array keeps the image layout (rows, cols[, slices]); headers
are not carried over, so no identifier reaches the dataset. An audit lists which
identifying attributes were removed (names of tags and counts, never values).

Ingest is incremental. Each input file's content hash is kept in a state file
outside the dataset (it names source paths); a re-run whose inputs and settings
are unchanged does nothing, and a grown export converts only its new files.
Patients already in the dataset keep their split.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from components.data.incremental import (  # save_state: re-exported, callers save what ingest_export returns
    STATE_VERSION, content_hash, fingerprint, load_state, matches_state, save_state,  # noqa: F401
)
from components.data.labels import LABEL_SEPARATOR, parse_label_set
from components.data.sources import FORMATS, CaseJob, ConvertedCase, convert_case, pseudonymise
from components.data.splits import assign_splits
from components.errors import BadInputData, IngestError
from components.machine import usable_cores
from components.progress import track

REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "sex", "age", "race", "site")
MAX_LISTED_PROBLEMS = 20
MANIFEST_COLUMNS = (
    "case_id", "patient_id", "split", "image", "label", "modality", "site", "sex", "age", "age_group",
    "race", "shape", "spacing", "dtype", "min", "max", "mean", "std", "nan_count", "inf_count", "sha256",
    "mask_shape", "mask_spacing", "foreground",
)
TASKS = ("classification", "multilabel", "segmentation", "unlabelled")
PARALLEL_MIN_CASES = 64


@dataclass(frozen=True)
class IngestSettings:
    """What an ingest makes of its inputs; any change makes a new dataset.

    Attributes:
        fmt: source format, ``dicom``, ``nifti`` or ``png``.
        task: ``classification`` (labels are classes), ``multilabel`` (labels are sets of classes written
            ``0|2``, empty for none), ``segmentation`` (labels are mask paths) or ``unlabelled`` (images for
            self-supervised pretraining: no label column needed, any given is not kept).
        num_classes: classes (labels of a multi-label task), or mask values ``0..num_classes-1``.
        age_bins: cut points of the age groups, years.
        val: fraction of patients in the validation split, per stratum.
        test: fraction of patients in the test split, per stratum.
        split_seed: seed of the patient-level split.
    """

    fmt: str = "dicom"
    task: str = "classification"
    num_classes: int = 2
    age_bins: tuple[int, ...] = (40, 60)
    val: float = 0.2
    test: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise IngestError(f"unknown source format {self.fmt!r}; expected one of {', '.join(FORMATS)}")
        if self.task not in TASKS:
            raise IngestError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")


@dataclass(frozen=True)
class IngestReport:
    """What an ingest did."""

    dataset_dir: Path
    manifest: Path
    n_cases: int
    n_patients: int
    removed_tags: dict[str, int]
    unchanged: bool = False
    converted: int = 0
    reused: int = 0
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def age_group(age: float, bins: Sequence[int]) -> str:
    """Age group label for ``age`` in years with cut points ``bins``: ``<40``, ``40-59``, ``60+``."""
    if pd.isna(age):
        return "unknown"
    edges = list(bins)
    if age < edges[0]:
        return f"<{edges[0]}"
    for low, high in zip(edges, edges[1:]):
        if low <= age < high:
            return f"{low}-{high - 1}"
    return f"{edges[-1]}+"


def _raise_problems(problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise BadInputData(f"{len(problems)} problem(s) in the input:\n" + "\n".join(shown) + more)


def read_labels(labels_csv: Path, *, settings: IngestSettings) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """Read the labels CSV and check its rows.

    Returns:
        The table (``label`` as int for classification) and the problems of single
        rows as (row index, message); rows with problems are still in the table.

    Raises:
        IngestError: when the file cannot be read or lacks a required column.
    """
    try:
        # index_col=False: a row with more fields than the header is an error, never an implicit index
        labels = pd.read_csv(labels_csv, dtype=str, index_col=False, keep_default_na=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise IngestError(f"cannot read labels file {labels_csv}: {exc}") from exc
    labels = labels.reset_index(drop=True)
    required = ("path",) if settings.task == "unlabelled" else REQUIRED_COLUMNS
    missing = [c for c in required if c not in labels.columns]
    if settings.fmt != "dicom" and "patient_id" not in labels.columns:
        missing.append("patient_id")
    if missing:
        raise IngestError(
            f"{labels_csv}: missing column(s) {', '.join(missing)}; "
            f"expected {','.join(required)} and optionally {','.join(OPTIONAL_COLUMNS)}"
            + ("" if settings.fmt == "dicom" else f" (patient_id is required for {settings.fmt} sources)")
        )
    problems = [(i, f"{labels_csv} row {i + 2}: duplicate path {p}") for i, p in labels["path"][labels["path"].duplicated()].items()]
    problems += [(i, f"{labels_csv} row {i + 2}: empty path") for i in labels.index[labels["path"].isna()]]
    if settings.task == "classification":
        numeric = pd.to_numeric(labels["label"], errors="coerce")
        bad = labels.index[numeric.isna() | ~numeric.isin(range(settings.num_classes))]
        problems += [
            (i, f"{labels_csv} row {i + 2}: label {str(labels.at[i, 'label'])!r} not in 0..{settings.num_classes - 1}")
            for i in bad
        ]
        labels["label"] = numeric.fillna(-1).astype(int)
    elif settings.task == "multilabel":
        parsed = [parse_label_set(v, settings.num_classes) for v in labels["label"]]
        problems += [(i, f"{labels_csv} row {i + 2}: label {str(labels.at[i, 'label'])!r} is not a set of classes "
                         f"in 0..{settings.num_classes - 1} written like 0{LABEL_SEPARATOR}2")
                     for i, v in zip(labels.index, parsed) if v is None]
        labels["label"] = [v if v is not None else "" for v in parsed]
    elif settings.task == "unlabelled":  # images only: a label column, if any, is not kept
        labels["label"] = ""
    else:
        problems += [(i, f"{labels_csv} row {i + 2}: no mask path in column label") for i in labels.index[labels["label"].isna()]]
    if "patient_id" in labels.columns and settings.fmt != "dicom":
        problems += [(i, f"{labels_csv} row {i + 2}: empty patient_id") for i in labels.index[labels["patient_id"].isna()]]
    if "age" in labels.columns:
        age = pd.to_numeric(labels["age"], errors="coerce")
        bad = labels.index[age.isna() & labels["age"].notna()]
        problems += [(i, f"{labels_csv} row {i + 2}: age {labels.at[i, 'age']!r} is not a number") for i in bad]
        labels["age"] = age
    return labels, problems


def _run_jobs(jobs: list[CaseJob], workers: int) -> list[ConvertedCase | list[str]]:
    """Convert every job, in worker processes when there are enough of them; with a progress bar."""
    description = f"Converting {len(jobs)} case(s)"
    if workers <= 1 or len(jobs) < PARALLEL_MIN_CASES:
        return [convert_case(j) for j in track(jobs, description=description)]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        return list(track(pool.map(convert_case, jobs, chunksize=chunk), total=len(jobs), description=description))


def default_workers() -> int:
    """Conversion processes: every core this process may use, at most 8."""
    return min(8, usable_cores())


def _hash_inputs(source: Path, labels_csv: Path, settings: IngestSettings, salt: bytes, state: dict):
    """Labels, row problems, content hash per input, refreshed hash cache, and the fingerprint of it all."""
    if not source.is_dir():
        raise IngestError(f"source folder {source} does not exist or is not a folder")
    labels, row_problems = read_labels(labels_csv, settings=settings)
    cache, hashes, inputs = state.get("hashes", {}), {}, {}
    problems: dict[int, list[str]] = {}
    for i, message in row_problems:
        problems.setdefault(i, []).append(message)
    for i, rec in labels.iterrows():
        if i in problems:
            continue
        paths = [("path", rec["path"])] + ([("label", rec["label"])] if settings.task == "segmentation" else [])
        for column, rel in paths:
            full = source / rel
            if not full.exists():
                problems.setdefault(i, []).append(f"{labels_csv} row {i + 2}: {rel}: file not found")
            elif column == "path":
                inputs[rel] = content_hash(full, cache, hashes)
            else:
                inputs[rel] = inputs.get(rec["path"], "") + ":" + content_hash(full, cache, hashes)
    return labels, problems, inputs, hashes, fingerprint(settings, salt, labels_csv, inputs)


def unchanged_version(
    *, source: Path, labels_csv: Path, dataset_dir: Path, settings: IngestSettings, salt: bytes, state_file: Path
) -> str | None:
    """The data version an ingest would keep, when the inputs are unchanged since it was made; else None.

    Hashing only (sizes and mtimes spare re-reading unchanged files): nothing is converted or written.
    """
    state = load_state(state_file)
    if not state.get("data_version") or not labels_csv.exists():
        return None
    try:
        _, problems, _, _, fingerprint = _hash_inputs(source, labels_csv, settings, salt, state)
    except IngestError:
        return None
    if problems or not matches_state(state, fingerprint, dataset_dir / "manifest.parquet"):
        return None
    return str(state["data_version"])


def ingest_export(
    *,
    source: Path,
    labels_csv: Path,
    dataset_dir: Path,
    settings: IngestSettings,
    salt: bytes,
    skip_bad: bool = False,
    workers: int = 1,
    state_file: Path | None = None,
) -> tuple[IngestReport, dict]:
    """Convert an export into ``dataset_dir`` (``images/``, ``labels/``, ``manifest.parquet``).

    Args:
        source: export folder; labels paths are relative to it.
        labels_csv: ``path,label`` plus optional ``patient_id,sex,age,race,site``.
        dataset_dir: target ``data/<name>``; replaced only when the whole ingest succeeded.
        settings: format, task, classes and split settings.
        salt: key of the pseudonyms.
        skip_bad: ingest the good cases and record the bad ones instead of failing.
        workers: conversion processes.
        state_file: where the incremental state lives (outside the dataset); None disables reuse.

    Returns:
        The report, and the new state to record with :func:`save_state` once the dataset is versioned.

    Raises:
        IngestError: naming every file or row that could not be ingested.
    """
    state = load_state(state_file)
    labels, problems, inputs, hashes, fingerprint = _hash_inputs(source, labels_csv, settings, salt, state)
    manifest_path = dataset_dir / "manifest.parquet"
    if not problems and matches_state(state, fingerprint, manifest_path):
        manifest = load_manifest(manifest_path)
        audit = json.loads((dataset_dir / "deid_audit.json").read_text()) if (dataset_dir / "deid_audit.json").exists() else {}
        report = IngestReport(
            dataset_dir=dataset_dir, manifest=manifest_path, n_cases=len(manifest),
            n_patients=manifest["patient_id"].nunique(), removed_tags=audit.get("removed_tags", {}),
            unchanged=True, reused=len(manifest),
        )
        return report, state
    previous = load_manifest(manifest_path) if manifest_path.exists() else None
    staging = dataset_dir.parent / f".{dataset_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    if settings.task == "segmentation":
        (staging / "labels").mkdir()
    try:
        report, new_state = _build(
            labels=labels, source=source, labels_csv=labels_csv, staging=staging, dataset_dir=dataset_dir,
            settings=settings, salt=salt, skip_bad=skip_bad, workers=workers, problems=problems,
            inputs=inputs, previous=previous, state=state,
        )
    except OSError as exc:  # a full disk, a read-only or vanished folder while writing the new version
        shutil.rmtree(staging, ignore_errors=True)
        kept = "the previous version is unchanged" if previous is not None else "nothing was written"
        raise IngestError(f"cannot write dataset {dataset_dir.name}: {exc.strerror or exc} while writing "
                          f"{exc.filename or staging}; {kept}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _move_into_place(staging, dataset_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise IngestError(f"cannot move the new version of dataset {dataset_dir.name} into place: "
                          f"{exc.strerror or exc}") from exc
    new_state |= {"version": STATE_VERSION, "fingerprint": fingerprint, "hashes": hashes,
                  "manifest_sha256": hashlib.sha256(manifest_path.read_bytes()).hexdigest()}
    return report, new_state


def _build(
    *, labels, source, labels_csv, staging, dataset_dir, settings, salt, skip_bad, workers, problems, inputs, previous, state
) -> tuple[IngestReport, dict]:
    """Convert or reuse every good row into ``staging``; write manifest and audit there."""
    known = state.get("cases", {}) if previous is not None else {}
    previous_rows = previous.set_index("case_id") if previous is not None else None
    jobs, reused = [], {}
    for i, rec in labels.iterrows():
        if i in problems:
            continue
        rel = rec["path"]
        entry = known.get(rel)
        if entry and entry["input"] == inputs.get(rel) and entry["mask_input"] == inputs.get(rec["label"]) \
                and entry["case_id"] in previous_rows.index:
            reused[i] = entry
            _link(dataset_dir / previous_rows.at[entry["case_id"], "image"], staging / previous_rows.at[entry["case_id"], "image"])
            if settings.task == "segmentation":
                _link(dataset_dir / previous_rows.at[entry["case_id"], "label"], staging / previous_rows.at[entry["case_id"], "label"])
            continue
        mask = source / rec["label"] if settings.task == "segmentation" else None
        jobs.append(CaseJob(i, source / rel, rel, settings.fmt, mask, settings.num_classes, staging, salt))
    converted = {}
    for job, result in zip(jobs, _run_jobs(jobs, workers)):
        if isinstance(result, list):
            problems.setdefault(job.row, []).extend(result)
        else:
            converted[job.row] = result
    del jobs  # each case's metadata is held once from here on: see the rows below
    first_row_of: dict[str, int] = {}
    for i, c in sorted(converted.items()):
        if c.case_id in first_row_of:  # the same DICOM instance (or series) listed twice, maybe in two syntaxes
            problems.setdefault(i, []).append(
                f"{labels_csv} row {i + 2}: {labels.at[i, 'path']} is the same image as row "
                f"{first_row_of[c.case_id] + 2} ({labels.at[first_row_of[c.case_id], 'path']}): same SOP/Series Instance UID"
            )
        else:
            first_row_of[c.case_id] = i
    for i, c in converted.items():
        if not c.raw_patient_id and pd.isna(labels.at[i, "patient_id"] if "patient_id" in labels.columns else None):
            problems.setdefault(i, []).append(f"{source / labels.at[i, 'path']}: no PatientID in the header and no patient_id in the labels")
    if problems and not skip_bad:
        _raise_problems([m for i in sorted(problems) for m in problems[i]])
    for i in problems:
        converted.pop(i, None)
        reused.pop(i, None)
    if not converted and not reused:
        raise IngestError(f"{labels_csv}: no rows to ingest" + (f" ({len(problems)} skipped as bad)" if problems else ""))
    n_converted = len(converted)
    rows, raw_patients, removed, cases_state = [], [], Counter(), {}
    for i, rec in labels.iterrows():
        if i in converted:
            c = converted.pop(i)  # its row now holds its facts: a case's metadata is held once, not twice
            listed = rec.get("patient_id")
            raw = c.raw_patient_id or ("" if pd.isna(listed) else str(listed))
            row = {"case_id": c.case_id, "patient_id": pseudonymise(raw, salt=salt, prefix="P"), "modality": c.modality, **c.facts}
            removed.update(c.removed_tags)
            entry = {"case_id": c.case_id, "removed_tags": list(c.removed_tags)}
        elif i in reused:
            entry = reused[i]
            row = previous_rows.loc[entry["case_id"]].to_dict() | {"case_id": entry["case_id"]}
            raw = None
            removed.update(entry["removed_tags"])
        else:
            continue
        entry |= {"input": inputs.get(rec["path"]), "mask_input": inputs.get(rec["label"])}
        cases_state[rec["path"]] = entry
        if settings.task == "classification":
            row["label"] = int(rec["label"])
        elif settings.task in ("multilabel", "unlabelled"):
            row["label"] = rec["label"]
        for c in ("site", "sex", "race"):
            if c in labels.columns:
                row[c] = rec[c]
        if "age" in labels.columns:
            row["age"] = float(rec["age"])
            row["age_group"] = age_group(rec["age"], settings.age_bins)
        rows.append(row)
        raw_patients.append(raw)
    manifest = pd.DataFrame(rows)
    del rows
    manifest["split"] = _splits(manifest, raw_patients, previous, settings)
    manifest = manifest[[c for c in MANIFEST_COLUMNS if c in manifest.columns]]
    manifest.to_parquet(staging / "manifest.parquet", index=False)
    audit = {"profile": "DICOM PS3.15 basic confidentiality (subset)", "removed_tags": dict(sorted(removed.items()))}
    (staging / "deid_audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    skipped = tuple((str(labels.at[i, "path"]), "; ".join(problems[i])) for i in sorted(problems))
    report = IngestReport(
        dataset_dir=dataset_dir, manifest=dataset_dir / "manifest.parquet", n_cases=len(manifest),
        n_patients=manifest["patient_id"].nunique(), removed_tags=dict(removed),
        converted=n_converted, reused=len(reused), skipped=skipped,
    )
    return report, {"cases": cases_state}


def _splits(manifest: pd.DataFrame, raw_patients: list, previous: pd.DataFrame | None, settings: IngestSettings) -> pd.Series:
    """Patients already in the dataset keep their split; new ones are ranked by their source IDs.

    The source IDs are used here and never stored, so the same export and seed give the
    same splits in any workspace, whatever its pseudonym key.
    """
    kept = {}
    if previous is not None and "split" in previous.columns:
        kept = previous.groupby("patient_id")["split"].first().to_dict()
    rank_ids = pd.Series([r if r is not None else p for r, p in zip(raw_patients, manifest["patient_id"])], index=manifest.index)
    by_label = settings.task in ("classification", "multilabel")  # a multi-label stratum is a set of classes
    stratify = manifest[["patient_id"] + (["label"] if by_label else []) + (["site"] if "site" in manifest.columns else [])]
    if not by_label:
        stratify = stratify.assign(label=0)
    return assign_splits(
        stratify, val=settings.val, test=settings.test, seed=settings.split_seed, previous=kept, rank_ids=rank_ids
    )


def _link(src: Path, dst: Path) -> None:
    """Reuse an unchanged converted file: a hard link where the file system allows, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames, so no reader sees a partial folder."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)  # the previous version goes back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_ingest_report(report: IngestReport, path: Path) -> Path:
    """The ingest report (counts, reuse, skipped inputs and why) as JSON; it names source paths, so it stays outside the dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "dataset": str(report.dataset_dir), "n_cases": report.n_cases, "n_patients": report.n_patients,
        "unchanged": report.unchanged, "converted": report.converted, "reused": report.reused,
        "skipped": [{"path": p, "reason": r} for p, r in report.skipped], "removed_tags": report.removed_tags,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def load_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest (Parquet or CSV)."""
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read manifest {path}: {exc}") from exc
