"""Ingest a DICOM export: convert to NIfTI, pseudonymise, write the manifest.

The dataset is written to a temporary folder beside its target and moved into
place only when every case converted, so a failed ingest leaves nothing
half-written. Images become NIfTI files whose voxel array keeps the DICOM
layout (rows, cols); headers are not carried over, so no identifier reaches
the dataset. An audit lists which identifying attributes were removed (names
of tags and counts, never values).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from rich.progress import track

from components.data.splits import assign_splits
from components.errors import IngestError

# Attributes of the DICOM basic confidentiality profile (PS3.15 table E.1-1) that
# matter for these exports; none of them is carried into the dataset.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
    "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "DeviceSerialNumber", "StationName",
)
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "sex", "age", "race", "site")
MAX_LISTED_PROBLEMS = 20
MANIFEST_COLUMNS = (
    "case_id", "patient_id", "split", "image", "label", "modality", "site", "sex", "age", "age_group",
    "race", "shape", "spacing", "dtype", "min", "max", "nan_count", "sha256",
)


@dataclass(frozen=True)
class IngestReport:
    """What an ingest wrote."""

    dataset_dir: Path
    manifest: Path
    n_cases: int
    n_patients: int
    removed_tags: dict[str, int]


def load_salt(path: Path) -> bytes:
    """The pseudonymisation key at ``path``, created (mode 600) on first use.

    It lives outside the dataset: whoever holds it can link pseudonyms to IDs.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def pseudonymise(value: str, *, salt: bytes, prefix: str) -> str:
    """A stable salted pseudonym: ``prefix`` + 12 hex digits of HMAC-SHA256."""
    return prefix + hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:12]


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


def read_labels(labels_csv: Path, *, num_classes: int) -> pd.DataFrame:
    """Read and check the labels CSV; every problem is reported at once."""
    try:
        labels = pd.read_csv(labels_csv, dtype={"path": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise IngestError(f"cannot read labels file {labels_csv}: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in labels.columns]
    if missing:
        raise IngestError(
            f"{labels_csv}: missing column(s) {', '.join(missing)}; "
            f"expected {','.join(REQUIRED_COLUMNS)} and optionally {','.join(OPTIONAL_COLUMNS)}"
        )
    problems = []
    duplicated = labels["path"][labels["path"].duplicated()]
    problems += [f"{labels_csv} row {i + 2}: duplicate path {p}" for i, p in duplicated.items()]
    numeric = pd.to_numeric(labels["label"], errors="coerce")
    bad = labels.index[numeric.isna() | ~numeric.isin(range(num_classes))]
    problems += [
        f"{labels_csv} row {i + 2}: label {str(labels.at[i, 'label'])!r} not in 0..{num_classes - 1}" for i in bad
    ]
    _raise_problems(problems)
    return labels.assign(label=numeric.astype(int))


def _raise_problems(problems: list[str]) -> None:
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise IngestError(f"{len(problems)} problem(s) in the input:\n" + "\n".join(shown) + more)


def _read_dicom(path: Path) -> tuple[np.ndarray, pydicom.Dataset]:
    """Pixel array after the modality LUT (float32, rows x cols) and the dataset."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise IngestError(f"{path}: not a DICOM file") from exc
    except (OSError, EOFError, ValueError) as exc:
        raise IngestError(f"{path}: unreadable DICOM ({exc})") from exc
    if "PixelData" not in ds:
        raise IngestError(f"{path}: DICOM without pixel data")
    try:
        pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except Exception as exc:  # pydicom raises many types for broken pixel data
        raise IngestError(f"{path}: cannot decode pixel data ({exc})") from exc
    return pixels, ds


def _nifti_affine(ds: pydicom.Dataset) -> np.ndarray:
    """Affine for a voxel array kept in DICOM layout: axis 0 = rows (y), axis 1 = cols (x), mm."""
    row_mm, col_mm = (float(v) for v in ds.get("PixelSpacing", [1.0, 1.0]))
    return np.array([[0, col_mm, 0, 0], [row_mm, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


def ingest_dicom(
    *,
    source: Path,
    labels_csv: Path,
    dataset_dir: Path,
    num_classes: int,
    age_bins: Sequence[int],
    split_fractions: tuple[float, float],
    split_seed: int,
    salt: bytes,
) -> IngestReport:
    """Convert a DICOM export into a dataset folder with ``images/`` and ``manifest.parquet``.

    Args:
        source: export folder; labels paths are relative to it.
        labels_csv: ``path,label`` plus optional ``patient_id,sex,age,race,site``.
        dataset_dir: target ``data/<name>``; replaced only when the whole ingest succeeded.
        num_classes: labels must be integers in ``0..num_classes-1``.
        age_bins: cut points of the age groups, years.
        split_fractions: (val, test) fractions of patients.
        split_seed: seed of the patient-level split.
        salt: key of the pseudonyms.

    Raises:
        IngestError: naming every file or row that could not be ingested.
    """
    if not source.is_dir():
        raise IngestError(f"source folder {source} does not exist or is not a folder")
    labels = read_labels(labels_csv, num_classes=num_classes)
    staging = dataset_dir.parent / f".{dataset_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    rows, problems, removed, source_patients = [], [], Counter(), []
    try:
        for i, rec in track(list(labels.iterrows()), description="Ingesting DICOM", transient=True):
            path = source / rec["path"]
            if not path.is_file():
                problems.append(f"{labels_csv} row {i + 2}: {rec['path']}: file not found")
                continue
            try:
                pixels, ds = _read_dicom(path)
            except IngestError as exc:
                problems.append(str(exc))
                continue
            removed.update(k for k in PHI_KEYWORDS if k in ds)
            raw_patient = str(ds.get("PatientID", "") or rec.get("patient_id", "") or "")
            if not raw_patient:
                problems.append(f"{path}: no PatientID in the header and no patient_id in the labels")
                continue
            case_id = pseudonymise(str(ds.get("SOPInstanceUID", rec["path"])), salt=salt, prefix="C")
            image_rel = f"images/{case_id}.nii.gz"
            nib.save(nib.Nifti1Image(pixels, _nifti_affine(ds)), staging / image_rel)
            spacing = nib.affines.voxel_sizes(_nifti_affine(ds))[:2]
            row = {
                "case_id": case_id,
                "patient_id": pseudonymise(raw_patient, salt=salt, prefix="P"),
                "image": image_rel,
                "label": int(rec["label"]),
                "modality": str(ds.get("Modality", "OT")),
                **{c: rec[c] for c in ("site", "sex", "race") if c in labels.columns},
            }
            if "age" in labels.columns:
                row["age"] = float(rec["age"])
                row["age_group"] = age_group(rec["age"], age_bins)
            row.update(
                shape="x".join(str(s) for s in pixels.shape),
                spacing="x".join(f"{s:g}" for s in spacing),
                dtype=str(pixels.dtype),
                min=float(np.nanmin(pixels)),
                max=float(np.nanmax(pixels)),
                nan_count=int(np.isnan(pixels).sum()),
                sha256=hashlib.sha256(pixels.tobytes()).hexdigest(),
            )
            rows.append(row)
            source_patients.append(raw_patient)
        _raise_problems(problems)
        if not rows:
            raise IngestError(f"{labels_csv}: no rows to ingest")
        # keep the export's order, and split on the source patient IDs (used here, never stored), so
        # that the same export and seed give the same dataset in any workspace, whatever its key
        manifest = pd.DataFrame(rows)
        val, test = split_fractions
        manifest["split"] = assign_splits(
            manifest.assign(patient_id=source_patients), val=val, test=test, seed=split_seed
        )
        manifest = manifest[[c for c in MANIFEST_COLUMNS if c in manifest.columns]]
        manifest.to_parquet(staging / "manifest.parquet", index=False)
        audit = {"profile": "DICOM PS3.15 basic confidentiality (subset)", "removed_tags": dict(sorted(removed.items()))}
        (staging / "deid_audit.json").write_text(json.dumps(audit, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, dataset_dir)
    return IngestReport(
        dataset_dir=dataset_dir,
        manifest=dataset_dir / "manifest.parquet",
        n_cases=len(manifest),
        n_patients=manifest["patient_id"].nunique(),
        removed_tags=dict(removed),
    )


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` with two renames, so no reader sees a partial folder."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load_manifest(path: Path) -> pd.DataFrame:
    """Read a manifest (Parquet or CSV)."""
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read manifest {path}: {exc}") from exc
