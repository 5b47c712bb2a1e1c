"""Read one DICOM case (a file, or a folder holding one series) into a voxel array and affine.

Single-frame images, multi-frame files (legacy and enhanced) and series of
single-frame files are read with pydicom; compressed transfer syntaxes (JPEG,
JPEG-LS, JPEG 2000, RLE) decode through the pixel-data plugins installed with
medflow (pylibjpeg, pyjpegls). Values are those after the modality LUT
(RescaleSlope/Intercept or a LUT sequence), per frame where an enhanced file
says so.

The voxel array keeps the DICOM layout: axis 0 = rows, axis 1 = columns, axis
2 = slices sorted by position along the slice normal. The affine maps it to RAS
millimetres (nibabel's convention) following the DICOM affine formula
(https://nipy.org/nibabel/dicom/dicom_orientation.html); images without patient
geometry (CR, DX, secondary captures) get their pixel spacing only.

MONAI's ``PydicomReader`` stacks a folder by InstanceNumber and does not group
files by series, and nibabel's DICOM wrappers read one file at a time; grouping
by SeriesInstanceUID and sorting by position is therefore done here.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut

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
PHI_TAGS = {keyword: tag_for_keyword(keyword) for keyword in PHI_KEYWORDS}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IGNORED_NAMES = ("DICOMDIR",)
PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
DEFER_BYTES = 64 * 1024  # elements this large (pixel data) stay on disk until their value is used
FUNCTIONAL_TAGS = {0x52009229, 0x52009230}  # Shared and PerFrame FunctionalGroupsSequence
# what reading a header's values raises: pydicom's conversions, and numpy's on geometry of the wrong kind
HEADER_ERRORS = (ValueError, TypeError, IndexError, AttributeError, ZeroDivisionError, OverflowError, RuntimeError,
                 KeyError, struct.error, EOFError, OSError, BytesLengthException)


@dataclass(frozen=True)
class DicomCase:
    """One case read from DICOM. ``patient_id`` and ``case_uid`` identify it and are never stored.

    ``case_uid`` is the SOPInstanceUID of a file, the SeriesInstanceUID of a series folder.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str
    patient_id: str
    case_uid: str
    removed_tags: tuple[str, ...]


def read_file(path: Path) -> pydicom.Dataset:
    """The dataset in ``path``, with a message naming the file when it is not readable DICOM. Its pixel data
    is read from the file when decoded (:func:`_pixels`), so a series' headers cost little memory.

    pydicom converts an element's value when it is first used: an element medflow never reads (names, dates,
    private tags) is never parsed, and one that is corrupt is reported where it is read (:func:`read_dicom_case`
    names the file). Parsing every element here cost a sixth of a small image's conversion."""
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except InvalidDicomError as exc:
        raise IngestError(f"{path}: not a DICOM file") from exc
    except Exception as exc:  # pydicom raises many types for corrupt headers
        raise IngestError(f"{path}: unreadable DICOM ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise IngestError(f"{path}: DICOM without pixel data")
    return ds


def _pixels(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Decoded frames as float32 (frames, rows, cols) after the modality LUT; colour becomes luma."""
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom and its plugins raise many types for broken pixel data
        raise IngestError(f"{path}: cannot decode pixel data ({exc})") from exc
    frames = _frame_count(ds)
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        raw = raw.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    raw = raw.reshape(frames, int(ds.Rows), int(ds.Columns))
    scales = _frame_rescales(ds, frames)
    if scales is None:
        try:
            values = apply_modality_lut(raw, ds)
        except (AttributeError, ValueError, IndexError) as exc:
            raise IngestError(f"{path}: cannot apply the modality LUT ({exc})") from exc
        return np.asarray(values, dtype=np.float32)
    slopes, intercepts = scales
    return (raw.astype(np.float64) * slopes[:, None, None] + intercepts[:, None, None]).astype(np.float32)


def _functional(ds: pydicom.Dataset, index: int, sequence: str) -> pydicom.Dataset | None:
    """An enhanced file's functional group item for frame ``index``: per-frame first, then shared."""
    if FUNCTIONAL_TAGS.isdisjoint(ds.keys()):  # not an enhanced file: a set test, no keyword lookups
        return None
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[index] if len(groups) > index and groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        if sequence in item and item[sequence].value:
            return item[sequence][0]
    return None


def _frame_rescales(ds: pydicom.Dataset, frames: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-frame slope and intercept of an enhanced multi-frame file, or None when it has none."""
    if "RescaleSlope" in ds or "ModalityLUTSequence" in ds:
        return None
    items = [_functional(ds, i, "PixelValueTransformationSequence") for i in range(frames)]
    if not any(item is not None and "RescaleSlope" in item for item in items):
        return None
    slopes = np.array([float(item.get("RescaleSlope", 1.0)) if item else 1.0 for item in items])
    intercepts = np.array([float(item.get("RescaleIntercept", 0.0)) if item else 0.0 for item in items])
    return slopes, intercepts


def frame_plane(ds: pydicom.Dataset, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(orientation 6-vector, position 3-vector, (row, col) spacing) of frame ``index``, or None."""
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    spacing = ds.get("PixelSpacing")
    if orientation is None:
        item = _functional(ds, index, "PlaneOrientationSequence")
        orientation = item.get("ImageOrientationPatient") if item else None
    if position is None or "PerFrameFunctionalGroupsSequence" in ds:
        item = _functional(ds, index, "PlanePositionSequence")
        position = item.get("ImagePositionPatient") if item else position
    if spacing is None:
        item = _functional(ds, index, "PixelMeasuresSequence")
        spacing = item.get("PixelSpacing") if item else None
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return None
    spacing = spacing if spacing is not None and len(spacing) == 2 else (1.0, 1.0)
    return (np.asarray(orientation, float), np.asarray(position, float), np.asarray(spacing, float))


def _slice_thickness(ds: pydicom.Dataset) -> float:
    item = _functional(ds, 0, "PixelMeasuresSequence")
    for source in (ds, item):
        if source is not None:
            for key in ("SpacingBetweenSlices", "SliceThickness"):
                value = source.get(key)
                if value not in (None, ""):
                    return abs(float(value)) or 1.0
    return 1.0


def _affine(planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], thickness: float) -> np.ndarray:
    """RAS affine of (rows, cols, slices) from the sorted planes' geometry (DICOM affine formula)."""
    orientation, first, (row_mm, col_mm) = planes[0]
    along_row, along_col = orientation[:3], orientation[3:]
    normal = np.cross(along_row, along_col)
    # one slice: the slice axis completes (rows, cols) to a right-handed frame, as nibabel's wrappers do
    step = (planes[-1][1] - first) / (len(planes) - 1) if len(planes) > 1 else -normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = along_col * row_mm
    lps[:3, 1] = along_row * col_mm
    lps[:3, 2] = step
    lps[:3, 3] = first
    return LPS_TO_RAS @ lps


def _pixel_spacing_affine(ds: pydicom.Dataset) -> np.ndarray:
    """Affine of an image without patient geometry: its pixel spacing (or 1 mm) on rows and columns."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
    row_mm, col_mm = (float(v) for v in spacing)
    return np.array([[0, col_mm, 0, 0], [row_mm, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)


def _position_order(planes: list, where: Path) -> list[int]:
    """The frames' order along the slice normal; orientations must agree, positions be distinct and even."""
    orientation = planes[0][0]
    if any(not np.allclose(p[0], orientation, atol=1e-3) for p in planes):
        raise IngestError(f"{where}: slices with different orientations in one series")
    normal = np.cross(orientation[:3], orientation[3:])
    order = np.argsort([float(np.dot(normal, p[1])) for p in planes], kind="stable")
    positions = [float(np.dot(normal, planes[i][1])) for i in order]
    if len(positions) != len(set(np.round(positions, 4))):
        raise IngestError(f"{where}: two slices at the same position in one series")
    gaps = np.diff(positions)
    if len(gaps) and np.ptp(gaps) > max(0.01, 0.01 * abs(float(gaps.mean()))):
        raise IngestError(
            f"{where}: uneven slice spacing ({gaps.min():g} to {gaps.max():g} mm); "
            "one volume needs evenly spaced slices (a gap or a scout in the series?)"
        )
    return [int(i) for i in order]


def _legacy_frame_planes(ds: pydicom.Dataset, planes: list, thickness: float) -> list:
    """Planes of a multi-frame file that gives one position for all frames (RT dose, legacy NM/US).

    The frames lie along the slice normal at GridFrameOffsetVector (mm) or every ``thickness`` mm.
    """
    if any(not np.allclose(p[1], planes[0][1]) for p in planes):
        return planes
    orientation, first, spacing = planes[0]
    normal = np.cross(orientation[:3], orientation[3:])
    offsets = ds.get("GridFrameOffsetVector")
    if offsets is None or len(offsets) != len(planes):
        offsets = [i * thickness for i in range(len(planes))]
    return [(orientation, first + normal * float(o), spacing) for o in offsets]


def _frame_count(ds: pydicom.Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _volume(datasets: list[tuple[Path, pydicom.Dataset]], where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array (rows, cols[, slices]) and RAS affine of one series' datasets.

    The geometry comes from the headers first; then each file's pixels are decoded straight into their slices
    of the volume and dropped, so a large series (a CT of 512x512x300) peaks at about its volume, not at its
    files' pixel data plus every decoded frame plus their stack."""
    shapes = sorted({(int(ds.Rows), int(ds.Columns)) for _, ds in datasets})
    if len(shapes) > 1:
        raise IngestError(f"{where}: slices of different sizes in one series: {shapes}")
    sources = [(k, i) for k, (_, ds) in enumerate(datasets) for i in range(_frame_count(ds))]
    planes = [frame_plane(datasets[k][1], i) for k, i in sources]
    thickness = _slice_thickness(datasets[0][1])
    if len(datasets) == 1 and len(sources) > 1 and all(p is not None for p in planes):
        planes = _legacy_frame_planes(datasets[0][1], planes, thickness)
    order = list(range(len(sources)))
    if all(p is not None for p in planes):
        if len(sources) > 1:
            order = _position_order(planes, where)
        affine = _affine([planes[i] for i in order], thickness)
    elif len(sources) > 1 and len(datasets) > 1:
        raise IngestError(f"{where}: a series without ImagePositionPatient/ImageOrientationPatient cannot be stacked")
    else:
        affine = _pixel_spacing_affine(datasets[0][1])
        affine[2, 2] = thickness
    slot = {sources[i]: s for s, i in enumerate(order)}
    volume = np.empty((*shapes[0], len(sources)), dtype=np.float32)
    for k, (path, ds) in enumerate(datasets):
        pixels = _pixels(ds, path)
        for i in range(pixels.shape[0]):
            volume[:, :, slot[k, i]] = pixels[i]
        if len(datasets) > 1:  # a series: the files still to decode need the room (one file's go with it)
            _drop_pixels(ds)
    return (volume[:, :, 0] if len(sources) == 1 else volume), affine


def _drop_pixels(ds: pydicom.Dataset) -> None:
    """Forget a decoded file's pixel data (and pydicom's decoded copy): its values are in the volume now."""
    for tag in PIXEL_TAGS & set(ds.keys()):
        del ds[tag]
    ds._pixel_array = None  # noqa: SLF001 (pydicom keeps the decoded array; no public call drops it)


def _header_error(path: Path, exc: Exception) -> IngestError:
    """What a header value medflow reads and cannot use becomes: one line naming the file."""
    return IngestError(f"{path}: inconsistent DICOM header ({type(exc).__name__}: {exc})")


def _series_uid(path: Path, ds: pydicom.Dataset) -> str:
    try:
        return str(ds.get("SeriesInstanceUID", ""))
    except HEADER_ERRORS as exc:
        raise _header_error(path, exc) from exc


def read_dicom_case(path: Path) -> DicomCase:
    """Read a DICOM file or a folder holding one series.

    Args:
        path: one file (single- or multi-frame), or a folder whose files form one series.

    Raises:
        IngestError: naming the file or folder and what is wrong with it.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_NAMES)
        if not files:
            raise IngestError(f"{path}: folder holds no files")
        datasets = [(f, read_file(f)) for f in files]
        series = defaultdict(list)
        for f, ds in datasets:
            series[_series_uid(f, ds)].append((f, ds))
        if len(series) > 1:
            raise IngestError(
                f"{path}: folder holds {len(series)} series; a labels row must name one series (a file or a folder)"
            )
    else:
        datasets = [(path, read_file(path))]
    first = datasets[0][1]
    try:  # every element read here is parsed here, so that a corrupt one is reported naming the file
        array, affine = _volume(datasets, path)
        modality = str(first.get("Modality", "") or "OT")
        patient_id = str(first.get("PatientID", "") or "")
        case_uid = str(first.get("SeriesInstanceUID" if path.is_dir() else "SOPInstanceUID", "") or "")
    except HEADER_ERRORS as exc:
        # pixel data that does not fit Rows x Columns x frames, geometry values of the wrong kind, a value whose
        # length does not fit its VR, ...
        raise _header_error(path, exc) from exc
    present = [set(ds.keys()) for _, ds in datasets]  # tags only: no value is parsed
    removed = sorted({k for keys in present for k, tag in PHI_TAGS.items() if tag in keys})
    return DicomCase(
        array=array, affine=affine, modality=modality, patient_id=patient_id, case_uid=case_uid,
        removed_tags=tuple(removed),
    )
