"""Read one case of a source (DICOM, NIfTI, PNG/JPEG) and convert it to NIfTI with its image facts.

Every format ends as a float32 voxel array in image layout (rows, cols[, slices])
with a 4x4 RAS affine in millimetres: DICOM through :mod:`components.data.dicom`,
NIfTI as nibabel loads it (array and affine, no header fields carried over),
PNG/JPEG through Pillow with 1 mm pixels (colour becomes Pillow's ITU-R 601 luma).

:func:`convert_case` is the unit of work of an ingest: it runs in worker
processes, so it takes and returns plain picklable values.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import itertools
import multiprocessing
import secrets
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from components.data.dicom import read_dicom_case
from components.errors import IngestError
from components.progress import track

FORMATS = ("dicom", "nifti", "png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png", ".jpg", ".jpeg")
GEOMETRY_ATOL_MM = 1e-3
FACT_CHUNK = 1 << 18  # voxels per pass of image_facts: 1 MiB of float32
PARALLEL_MIN_CASES = 64  # fewer cases are converted in this process: starting workers costs more
IN_FLIGHT_BATCHES = 4  # conversion batches submitted per worker ahead of the results read
ONE_WRITE_BYTES = 32 << 20  # save_nifti compresses images up to this size in one write (2048x2048 float32: 16 MiB)


@dataclass(frozen=True)
class SourceImage:
    """A case as read from its source. ``patient_id`` and ``case_key`` are raw and never stored."""

    array: np.ndarray
    affine: np.ndarray
    modality: str
    patient_id: str
    case_key: str
    removed_tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaseJob:
    """One row of the labels file to convert; paths are absolute, ``out_dir`` is the staging dataset."""

    row: int
    path: Path
    rel_path: str
    fmt: str
    mask: Path | None
    num_classes: int
    out_dir: Path
    salt: bytes


@dataclass(frozen=True)
class ConvertedCase:
    """What :func:`convert_case` wrote: the case's files and facts, plus its raw patient ID (kept in memory)."""

    row: int
    case_id: str
    raw_patient_id: str
    modality: str
    removed_tags: tuple[str, ...]
    facts: dict


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


# what nibabel raises for a file that is not NIfTI, is cut short (EOFError from gzip, OSError uncompressed) or
# holds corrupt compressed data (zlib.error, which is not an OSError)
NIFTI_ERRORS = (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error)


def _read_nifti(path: Path, *, dtype: type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Array (as ``dtype``; None keeps the stored type after scaling) and affine of a NIfTI file."""
    try:
        image = nib.load(path)
        array = np.asarray(image.dataobj, dtype=dtype)
    except NIFTI_ERRORS as exc:
        raise IngestError(f"{path}: not a readable NIfTI file ({exc})") from exc
    return array, np.asarray(image.affine, dtype=float)


def _read_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 (only PNG sources need it)

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "I", "I;16", "F"):
                image = image.convert("L")
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise IngestError(f"{path}: not a readable PNG/JPEG image ({exc})") from exc
    affine = np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    return array, affine


def read_array(path: Path, *, dtype: type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine of a NIfTI, PNG/JPEG or DICOM file (or DICOM series folder), chosen by suffix; a
    NIfTI's array as ``dtype`` (None: as stored, so a uint8 mask is not made four times its size)."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path, dtype=dtype)
    if name.endswith(PNG_SUFFIXES):
        return _read_png(path)
    case = read_dicom_case(path)
    return case.array, case.affine


def read_source(path: Path, *, fmt: str, rel_path: str) -> SourceImage:
    """Read one case of a ``dicom``, ``nifti`` or ``png`` source.

    Args:
        path: the file (or, for DICOM, a folder holding one series).
        fmt: the source format.
        rel_path: the path as the labels file gives it; the case key of non-DICOM sources.
    """
    if fmt == "dicom":
        case = read_dicom_case(path)
        return SourceImage(
            case.array, case.affine, case.modality, case.patient_id, case.case_uid or rel_path, case.removed_tags
        )
    if path.is_dir():
        raise IngestError(f"{path}: a folder; {fmt} sources name one file per labels row")
    array, affine = _read_nifti(path) if fmt == "nifti" else _read_png(path)
    return SourceImage(array, affine, "OT", "", rel_path)


def save_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """``nib.save`` to a ``.nii.gz`` path, the same bytes, faster for the images most datasets hold.

    nibabel streams the voxels through gzip a slice of rows at a time (a 64x64 float32 image in 67 writes,
    each a Python call into gzip); an image of up to ``ONE_WRITE_BYTES`` is serialised by nibabel
    (``to_bytes``) and compressed in one write, with the level, time stamp and name nibabel's writer uses, so
    the file is byte for byte the one ``nib.save`` writes. A larger image (a full-size CT) is streamed by
    nibabel, so it is never held twice in memory. nibabel has no option for this; ``BENCHMARKS.md``
    (ingestion) has its effect: 0.2 ms of a 64x64 image's 1.3 ms write.
    """
    if not path.name.endswith(".gz") or image.dataobj.nbytes > ONE_WRITE_BYTES:
        nib.save(image, path)
        return
    data = image.to_bytes()
    with open(path, "wb") as file, gzip.GzipFile(fileobj=file, mode="wb", filename="", mtime=0,
                                                 compresslevel=nib.openers.Opener.default_compresslevel) as out:
        out.write(data)


def describe_geometry(array: np.ndarray, affine: np.ndarray) -> tuple[str, str]:
    """``shape`` and ``spacing`` facts: ``64x64x32`` and ``0.5x0.5x2`` (mm)."""
    spacing = nib.affines.voxel_sizes(affine)[: array.ndim]
    return "x".join(str(s) for s in array.shape), "x".join(f"{s:g}" for s in spacing)


def image_facts(array: np.ndarray, affine: np.ndarray) -> dict:
    """The manifest's image facts: geometry, dtype, range, non-finite counts, moments and content hash.

    Computed over chunks of ``FACT_CHUNK`` voxels (two passes: the mean, then the squared deviations from it,
    in float64), so a full-size CT costs a chunk's working memory on top of its volume, not two or three more
    volumes (numpy's finite selection, its deviations for the std, a bytes copy to hash). No library gives
    these in one bounded pass."""
    shape, spacing = describe_geometry(array, affine)
    flat = np.ascontiguousarray(array).reshape(-1)
    chunks = [flat[start:start + FACT_CHUNK] for start in range(0, flat.size, FACT_CHUNK)]
    digest, count, total, nans, infs = hashlib.sha256(), 0, 0.0, 0, 0
    low, high = np.inf, -np.inf
    whole = []  # per chunk: every value finite (the usual case, which skips the selections and counts)
    for chunk in chunks:
        digest.update(chunk.view(np.uint8))
        whole.append(bool(np.isfinite(chunk).all()))
        finite = chunk if whole[-1] else chunk[np.isfinite(chunk)]
        if not whole[-1]:
            nans, infs = nans + int(np.isnan(chunk).sum()), infs + int(np.isinf(chunk).sum())
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
            count, total = count + finite.size, total + float(finite.sum(dtype=np.float64))
    mean = total / count if count else float("nan")
    squares = 0.0
    for chunk, all_finite in zip(chunks, whole) if count else ():
        deviations = (chunk if all_finite else chunk[np.isfinite(chunk)]).astype(np.float64)
        deviations -= mean
        squares += float(np.square(deviations, out=deviations).sum())
    return {
        "shape": shape,
        "spacing": spacing,
        "dtype": str(array.dtype),
        "min": low if count else float("nan"),
        "max": high if count else float("nan"),
        "mean": mean,
        "std": float(np.sqrt(squares / count)) if count else float("nan"),
        "nan_count": nans,
        "inf_count": infs,
        "sha256": digest.hexdigest(),
    }


def _mask(job: CaseJob, image: SourceImage) -> tuple[np.ndarray, list[str]]:
    """The case's mask as uint8 on the image's grid, or the problems that prevent it."""
    mask, affine = read_array(job.mask, dtype=None)
    problems = []
    if mask.shape != image.array.shape or not np.allclose(affine, image.affine, atol=GEOMETRY_ATOL_MM):
        shape_i, spacing_i = describe_geometry(image.array, image.affine)
        shape_m, spacing_m = describe_geometry(mask, affine)
        problems.append(
            f"{job.mask}: mask geometry differs from its image {job.rel_path}: "
            f"image {shape_i} at {spacing_i} mm, mask {shape_m} at {spacing_m} mm"
            + ("" if mask.shape != image.array.shape else " (same shape, different affine)")
        )
    bad = bad_mask_values(mask, job.num_classes)
    if bad:
        problems.append(f"{job.mask}: mask values {bad[:5]} not in 0..{job.num_classes - 1}")
    return mask.astype(np.uint8, copy=False), problems


def bad_mask_values(mask: np.ndarray, num_classes: int) -> list[float]:
    """The distinct values of a mask that are not a class (whole numbers 0..num_classes-1), ascending. A mask
    stored as integers within range costs its min and max (a full-size CT mask in 0.1 s), not numpy's unique,
    which copies it to flat C order and sorts it (3 s)."""
    if mask.dtype.kind in "uib" and (not mask.size or (0 <= mask.min() and mask.max() < num_classes)):
        return []
    return [float(v) for v in np.unique(mask) if not (float(v).is_integer() and 0 <= v < num_classes)]


def convert_case(job: CaseJob) -> ConvertedCase | list[str]:
    """Read, check and write one case (image, and mask for segmentation) under ``job.out_dir``.

    Returns:
        The converted case, or the problems found (each names the file).
    """
    try:
        image = read_source(job.path, fmt=job.fmt, rel_path=job.rel_path)
        mask, problems = _mask(job, image) if job.mask is not None else (None, [])
    except IngestError as exc:
        return [str(exc)]
    if problems:
        return problems
    case_id = pseudonymise(image.case_key, salt=job.salt, prefix="C")
    image_rel = f"images/{case_id}.nii.gz"
    save_nifti(nib.Nifti1Image(image.array, image.affine), job.out_dir / image_rel)
    facts = {"image": image_rel, **image_facts(image.array, image.affine)}
    if mask is not None:
        mask_rel = f"labels/{case_id}.nii.gz"
        save_nifti(nib.Nifti1Image(mask, image.affine), job.out_dir / mask_rel)
        facts["label"] = mask_rel
        facts["mask_shape"], facts["mask_spacing"] = describe_geometry(mask, image.affine)
        facts["foreground"] = float((mask > 0).mean())
    return ConvertedCase(job.row, case_id, image.patient_id, image.modality, image.removed_tags, facts)


def convert_cases(jobs: list[CaseJob]) -> list[ConvertedCase | list[str]]:
    """:func:`convert_case` on each job: one submission to a worker process, which imports this module only."""
    return [convert_case(job) for job in jobs]


def convert_in_order(jobs: Iterator[CaseJob], total: int, workers: int) -> Iterator[ConvertedCase | list[str]]:
    """Each job's result, in the jobs' order, with a progress bar; in worker processes when there are enough jobs.

    At most ``IN_FLIGHT_BATCHES`` batches per worker are submitted ahead of the results read, so that neither
    the jobs nor their results are all held at once (``Executor.map`` submits every job before it yields;
    its ``buffersize`` arrives in Python 3.14).
    """
    description = f"Converting {total} case(s)"
    if workers <= 1 or total < PARALLEL_MIN_CASES:
        yield from track(map(convert_case, jobs), total=total, description=description)
        return
    size = max(1, min(64, total // (workers * 8)))
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        try:
            yield from track(_windowed(pool, jobs, size, IN_FLIGHT_BATCHES * workers, pending), total=total,
                             description=description)
        finally:
            for future in pending:  # stopped early (a bad case, an interrupt): nothing more is converted
                future.cancel()


def _windowed(pool: ProcessPoolExecutor, jobs: Iterator[CaseJob], size: int, window: int,
              pending: deque[Future]) -> Iterator[ConvertedCase | list[str]]:
    """The results of ``jobs`` submitted in batches of ``size``, at most ``window`` batches ahead (in ``pending``)."""
    for batch in iter(lambda: list(itertools.islice(jobs, size)), []):
        pending.append(pool.submit(convert_cases, batch))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()
