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
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from components.data.incremental import (  # load_state, save_state: re-exported for the callers of ingest_export
    TAG_SEPARATOR, IngestState, content_hash, fingerprint, load_state, matches_state, new_state,
    save_state,  # noqa: F401
)
from components.data.labels import age_group, label_rows, read_labels
from components.data.sources import FORMATS, CaseJob, convert_in_order, pseudonymise
from components.data.splits import assign_splits
from components.errors import BadInputData, IngestError
from components.machine import usable_cores

MAX_LISTED_PROBLEMS = 20
MANIFEST_COLUMNS = (
    "case_id", "patient_id", "split", "image", "label", "modality", "site", "sex", "age", "age_group",
    "race", "shape", "spacing", "dtype", "min", "max", "mean", "std", "nan_count", "inf_count", "sha256",
    "mask_shape", "mask_spacing", "foreground",
)
TASKS = ("classification", "multilabel", "segmentation", "unlabelled")
ROWS_PER_FRAME = 1024  # manifest rows held as Python objects at once; each batch then becomes a DataFrame


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


def _raise_problems(problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise BadInputData(f"{len(problems)} problem(s) in the input:\n" + "\n".join(shown) + more)


def default_workers() -> int:
    """Conversion processes: every core this process may use, at most 8."""
    return min(8, usable_cores())


def _hash_inputs(source: Path, labels_csv: Path, settings: IngestSettings, salt: bytes, previous: IngestState,
                 new: IngestState | None):
    """Labels, row problems, content hash per input, and the fingerprint of it all; each file's hash is recorded
    in ``new`` (None: nowhere), reused from ``previous`` while the file's size and mtime are unchanged."""
    if not source.is_dir():
        raise IngestError(f"source folder {source} does not exist or is not a folder")
    labels, row_problems = read_labels(labels_csv, task=settings.task, fmt=settings.fmt,
                                       num_classes=settings.num_classes)
    inputs = {}
    problems: dict[int, list[str]] = {}
    for i, message in row_problems:
        problems.setdefault(i, []).append(message)
    for i, rec in label_rows(labels):
        if i in problems:
            continue
        paths = [("path", rec["path"])] + ([("label", rec["label"])] if settings.task == "segmentation" else [])
        for column, rel in paths:
            full = source / rel
            if not full.exists():
                problems.setdefault(i, []).append(f"{labels_csv} row {i + 2}: {rel}: file not found")
            elif column == "path":
                inputs[rel] = content_hash(full, previous, new)
            else:
                inputs[rel] = inputs.get(rec["path"], "") + ":" + content_hash(full, previous, new)
    return labels, problems, inputs, fingerprint(settings, salt, labels_csv, inputs)


def unchanged_version(
    *, source: Path, labels_csv: Path, dataset_dir: Path, settings: IngestSettings, salt: bytes, state_file: Path
) -> str | None:
    """The data version an ingest would keep, when the inputs are unchanged since it was made; else None.

    Hashing only (sizes and mtimes spare re-reading unchanged files): nothing is converted or written.
    """
    state = load_state(state_file)
    if not state.data_version or not labels_csv.exists():
        return None
    try:
        _, problems, _, fingerprint = _hash_inputs(source, labels_csv, settings, salt, state, None)
    except IngestError:
        return None
    if problems or not matches_state(state, fingerprint, dataset_dir / "manifest.parquet"):
        return None
    return state.data_version


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
    new = new_state(state_file.parent if state_file is not None else None)
    labels, problems, inputs, fingerprint = _hash_inputs(source, labels_csv, settings, salt, state, new)
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
        report = _build(
            labels=labels, source=source, labels_csv=labels_csv, staging=staging, dataset_dir=dataset_dir,
            settings=settings, salt=salt, skip_bad=skip_bad, workers=workers, problems=problems,
            inputs=inputs, previous=previous, known=state, new=new,
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
    new.set_meta(fingerprint=fingerprint, manifest_sha256=hashlib.sha256(manifest_path.read_bytes()).hexdigest())
    return report, new


def _reusable(rec: dict, known: IngestState, inputs: dict, previous_rows: pd.DataFrame | None) -> dict | None:
    """The state entry of a row whose inputs are unchanged since its case was converted; else None."""
    if previous_rows is None:
        return None
    entry = known.case(rec["path"])
    if entry and entry["input"] == inputs.get(rec["path"]) and entry["mask_input"] == inputs.get(rec["label"]) \
            and entry["case_id"] in previous_rows.index:
        return entry
    return None


def _build(
    *, labels, source, labels_csv, staging, dataset_dir, settings, salt, skip_bad, workers, problems, inputs, previous,
    known, new
) -> IngestReport:
    """Convert or reuse every good row into ``staging``; write manifest and audit there.

    The conversions stream from the workers in the rows' order, and the manifest's rows are held as Python
    objects ``ROWS_PER_FRAME`` at a time, each batch then as a DataFrame: no phase holds every case's
    metadata as Python objects. Each case is recorded in ``new``; ``known`` holds the cases of ``previous``.
    """
    previous_rows = previous.set_index("case_id") if previous is not None else None
    bad = set(problems)  # rows found bad before converting: the job list and the rows below skip the same ones
    reused = set() if previous_rows is None else {
        i for i, rec in label_rows(labels) if i not in bad and _reusable(rec, known, inputs, previous_rows)}
    n_jobs = len(labels) - len(bad) - len(reused)

    def jobs() -> Iterator[CaseJob]:
        for i, rel, label in zip(labels.index, labels["path"], labels["label"]):
            if i not in bad and i not in reused:
                mask = source / label if settings.task == "segmentation" else None
                yield CaseJob(i, source / rel, rel, settings.fmt, mask, settings.num_classes, staging, salt)

    frames, batch = [], []
    with closing(convert_in_order(jobs(), n_jobs, workers)) as results:
        for i, rec in label_rows(labels):
            if i in bad:
                continue
            if i in reused:
                entry = known.case(rec["path"])
                previous_row = previous_rows.loc[entry["case_id"]]
                for column in ("image", "label") if settings.task == "segmentation" else ("image",):
                    _link(dataset_dir / previous_row[column], staging / previous_row[column])
                row = previous_row.to_dict() | {"case_id": entry["case_id"], "_raw": None}
                tags = entry["removed_tags"]
            else:
                c = next(results)
                if isinstance(c, list):
                    problems.setdefault(i, []).extend(c)
                    continue
                listed = rec.get("patient_id")
                if not c.raw_patient_id and pd.isna(listed):
                    problems.setdefault(i, []).append(
                        f"{source / rec['path']}: no PatientID in the header and no patient_id in the labels")
                    continue
                raw = c.raw_patient_id or str(listed)
                row = {"case_id": c.case_id, "patient_id": pseudonymise(raw, salt=salt, prefix="P"),
                       "modality": c.modality, **c.facts, "_raw": raw}
                tags = c.removed_tags
            row |= {"_row": i, "_reused": i in reused, "_removed": TAG_SEPARATOR.join(tags),
                    "_input": inputs.get(rec["path"]), "_mask_input": inputs.get(rec["label"])}
            if settings.task == "classification":
                row["label"] = int(rec["label"])
            elif settings.task in ("multilabel", "unlabelled"):
                row["label"] = rec["label"]
            for column in ("site", "sex", "race"):
                if column in labels.columns:
                    row[column] = rec[column]
            if "age" in labels.columns:
                row["age"] = float(rec["age"])
                row["age_group"] = age_group(rec["age"], settings.age_bins)
            batch.append(row)
            if len(batch) == ROWS_PER_FRAME:
                frames.append(pd.DataFrame(batch))
                batch = []
    if batch:
        frames.append(pd.DataFrame(batch))
    del batch
    cases = _concat(frames)
    del frames
    _flag_duplicates(cases, labels, labels_csv, problems)
    if problems and not skip_bad:
        _raise_problems([m for i in sorted(problems) for m in problems[i]])
    cases = cases[~cases["_row"].isin(list(problems))].reset_index(drop=True)
    if cases.empty:
        raise IngestError(f"{labels_csv}: no rows to ingest" + (f" ({len(problems)} skipped as bad)" if problems else ""))
    removed = Counter(tag for tags in cases["_removed"] for tag in tags.split(TAG_SEPARATOR) if tag)
    cases["split"] = _splits(cases, previous, settings)
    manifest = cases[[c for c in MANIFEST_COLUMNS if c in cases.columns]]
    manifest.to_parquet(staging / "manifest.parquet", index=False)
    del manifest
    audit = {"profile": "DICOM PS3.15 basic confidentiality (subset)", "removed_tags": dict(sorted(removed.items()))}
    (staging / "deid_audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    skipped = tuple((str(labels.at[i, "path"]), "; ".join(problems[i])) for i in sorted(problems))
    n_reused = int(cases["_reused"].sum())
    report = IngestReport(
        dataset_dir=dataset_dir, manifest=dataset_dir / "manifest.parquet", n_cases=len(cases),
        n_patients=cases["patient_id"].nunique(), removed_tags=dict(removed),
        converted=len(cases) - n_reused, reused=n_reused, skipped=skipped,
    )
    columns = (labels["path"].loc[cases["_row"]], cases["case_id"], cases["_removed"], cases["_input"],
               cases["_mask_input"])
    new.record_cases((rel, case_id, tags, _text(given), _text(mask))
                     for rel, case_id, tags, given, mask in zip(*columns))
    return report


def _text(value) -> str | None:
    """A string cell of the rows' frame; None where it is missing."""
    return None if pd.isna(value) else str(value)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The batches' frames as one; a column whose batches inferred different types (a batch of missing values
    beside one of strings) is inferred again over all its values, as one frame of every row would have."""
    if not frames:
        return pd.DataFrame({"case_id": pd.Series(dtype=str), "_row": pd.Series(dtype=int)})
    cases = pd.concat(frames, ignore_index=True)
    for column in cases.columns:
        if len({str(f[column].dtype) for f in frames if column in f.columns}) > 1:
            cases[column] = pd.Series(cases[column].tolist(), index=cases.index)
    return cases


def _flag_duplicates(cases: pd.DataFrame, labels: pd.DataFrame, labels_csv: Path, problems: dict) -> None:
    """A problem for each row whose case is an earlier row's: the same DICOM instance (or series) listed twice."""
    duplicated = cases["case_id"].duplicated()
    first_row_of = cases.loc[~duplicated].set_index("case_id")["_row"]
    for i, case_id in zip(cases.loc[duplicated, "_row"], cases.loc[duplicated, "case_id"]):
        first = first_row_of[case_id]
        problems.setdefault(i, []).append(
            f"{labels_csv} row {i + 2}: {labels.at[i, 'path']} is the same image as row {first + 2} "
            f"({labels.at[first, 'path']}): same SOP/Series Instance UID"
        )


def _splits(cases: pd.DataFrame, previous: pd.DataFrame | None, settings: IngestSettings) -> pd.Series:
    """Patients already in the dataset keep their split; new ones are ranked by their source IDs.

    The source IDs (``_raw``, missing for reused cases) are used here and never stored, so the same export and
    seed give the same splits in any workspace, whatever its pseudonym key.
    """
    kept = {}
    if previous is not None and "split" in previous.columns:
        kept = previous.groupby("patient_id")["split"].first().to_dict()
    rank_ids = cases["_raw"].where(cases["_raw"].notna(), cases["patient_id"])
    by_label = settings.task in ("classification", "multilabel")  # a multi-label stratum is a set of classes
    stratify = cases[["patient_id"] + (["label"] if by_label else []) + (["site"] if "site" in cases.columns else [])]
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


def load_manifest(path: Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a manifest (Parquet or CSV): every column, or those of ``columns`` that it has, in its own order
    (a reader that needs a few of its columns leaves the image facts and hashes unread)."""
    try:
        if columns is None:
            return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        wanted = set(columns)
        if path.suffix == ".parquet":
            return pd.read_parquet(path, columns=[c for c in pq.read_schema(path).names if c in wanted])
        return pd.read_csv(path, usecols=lambda c: c in wanted)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read manifest {path}: {exc}") from exc
