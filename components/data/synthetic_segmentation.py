"""A synthetic segmentation export for the demo: NIfTI volumes (or CT series in DICOM), their masks and a
labels CSV.

Each volume is smooth tissue texture with one to three bright ellipsoidal
lesions; the mask marks every voxel inside a lesion (label 1). As in the
classification demo, patients carry ``sex``, ``age``, ``race`` and a ``site`` with
its own contrast and noise, and ``bias`` fades the lesions of women (at 1 they
are a quarter as bright), so a trained model segments them measurably worse.
``depth`` 0 gives 2D images, otherwise volumes of that many slices.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from components.data.dicom import LPS_TO_RAS
from components.data.synthetic import BIASED_GROUP, RACES, SITES, SyntheticExport
from components.errors import ConfigError

LESION_AMPLITUDE = 0.8
VOXEL_MM = (0.8, 0.8, 2.0)
DICOM_SLOPE = 0.001  # stored integers are thousandths of the volume's values
COARSE_VOXELS = 1 << 24  # above this many voxels, make_volume draws its texture COARSE times coarser
COARSE = 8


def dicom_affine(spacing: tuple[float, float, float] = VOXEL_MM) -> np.ndarray:
    """The RAS affine ingestion reads from a series written by :func:`write_dicom_series` (axial slices, rows
    along the patient's posterior axis, columns along its left axis, slices upwards from the origin)."""
    row_mm, col_mm, slice_mm = spacing
    lps = np.array([[0, col_mm, 0, 0], [row_mm, 0, 0, 0], [0, 0, slice_mm, 0], [0, 0, 0, 1]], dtype=float)
    return LPS_TO_RAS @ lps


def write_dicom_series(folder: Path, volume: np.ndarray, *, patient_id: str, seed: int,
                       spacing: tuple[float, float, float] = VOXEL_MM) -> None:
    """Write ``volume`` (rows, columns, slices) as a CT series, one file per slice, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    entropy = [str(seed), patient_id]
    study, series, frame = (generate_uid(entropy_srcs=[*entropy, kind]) for kind in ("study", "series", "frame"))
    stored = np.round(volume / DICOM_SLOPE).astype(np.int16)
    for k in range(volume.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[*entropy, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = f"Synthetic^{patient_id}", patient_id, "O", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "medflow-synthetic"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing[2]]
        ds.PixelSpacing, ds.SliceThickness = [spacing[0], spacing[1]], spacing[2]
        ds.Rows, ds.Columns = volume.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = DICOM_SLOPE, 0, "US"
        ds.KVP, ds.PositionReferenceIndicator = 120, ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k]).tobytes()
        pydicom.dcmwrite(folder / f"slice{k:04d}.dcm", ds, enforce_file_format=True)


def make_volume(
    rng: np.random.Generator, *, shape: tuple[int, ...], lesion: float, contrast: float, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32, about [0, 1]) and its mask (uint8, 1 inside a lesion), of ``shape``.

    Above ``COARSE_VOXELS`` (a CT of 512x512x300) the smooth texture is drawn on a grid ``COARSE`` times
    coarser and interpolated up (it varies over a twelfth of the volume, so nothing is lost), and the lesions
    are measured on broadcast axes instead of a full grid of coordinates: a full-size volume in 13 s and
    2.1 GB, where the direct way took 43 s and 3.1 GB. Smaller volumes are drawn as before, value for value."""
    if math.prod(shape) <= COARSE_VOXELS:
        tissue = ndimage.gaussian_filter(rng.normal(size=shape), sigma=[s / 12 for s in shape])
    else:
        coarse = tuple(max(2, -(-s // COARSE)) for s in shape)
        tissue = ndimage.gaussian_filter(rng.normal(size=coarse), sigma=[c / 12 for c in coarse])
        tissue = ndimage.zoom(tissue, [s / c for s, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
    tissue = 0.35 + contrast * 0.15 * tissue / (tissue.std() + 1e-8)
    axes = [np.arange(s, dtype=np.float32).reshape([-1 if k == a else 1 for k in range(len(shape))])
            for a, s in enumerate(shape)]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        centre = [rng.uniform(0.25 * s, 0.75 * s) for s in shape]
        radii = [rng.uniform(0.08, 0.16) * s for s in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(axes, centre, radii)) <= 1.0
        mask |= inside
    image = tissue + lesion * ndimage.gaussian_filter(mask.astype(np.float32), sigma=0.7)
    image = image + rng.normal(scale=noise, size=shape)
    return image.astype(np.float32), mask.astype(np.uint8)


def generate_segmentation_export(
    folder: Path,
    *,
    n_patients: int = 40,
    image_size: int = 32,
    depth: int = 16,
    bias: float = 0.0,
    seed: int = 7,
    fmt: str = "nifti",
) -> SyntheticExport:
    """Write images and NIfTI masks and ``labels.csv`` (``path,label,patient_id,sex,age,race,site``).

    Args:
        folder: output folder; ``images/``, ``masks/`` and ``labels.csv`` are written inside.
        n_patients: one volume per patient.
        image_size: rows and columns of each slice.
        depth: slices per volume; 0 writes 2D images.
        bias: in [0, 1]; how much fainter the lesions of women are.
        seed: random seed; the same seed gives the same export.
        fmt: ``nifti`` (one file per volume) or ``dicom`` (one CT series folder per volume; volumes only).
    """
    if not 0.0 <= bias <= 1.0:
        raise ConfigError(f"bias must be in [0, 1], got {bias}")
    if fmt not in ("nifti", "dicom") or (fmt == "dicom" and not depth):
        raise ConfigError(f"fmt must be nifti, or dicom for volumes (depth > 0); got {fmt!r} with depth {depth}")
    rng = np.random.default_rng(seed)
    shape = (image_size, image_size, depth) if depth else (image_size, image_size)
    affine = (dicom_affine() if fmt == "dicom"
              else np.diag([*VOXEL_MM[: len(shape)], *([1.0] * (4 - len(shape)))]))
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(n_patients):
        sex = str(rng.choice(["F", "M"]))
        site = str(rng.choice(list(SITES)))
        age = int(rng.integers(20, 90))
        race = str(rng.choice(RACES))
        faint = 1.0 - 0.75 * bias if (BIASED_GROUP[0], sex) == BIASED_GROUP else 1.0
        contrast, noise = SITES[site]
        image, mask = make_volume(rng, shape=shape, lesion=LESION_AMPLITUDE * faint, contrast=contrast, noise=noise)
        image_path, mask_path = f"images/p{p:04d}.nii.gz", f"masks/p{p:04d}_seg.nii.gz"
        if fmt == "dicom":
            image_path = f"images/p{p:04d}"
            write_dicom_series(folder / image_path, image, patient_id=f"SYN{seed}-{p:05d}", seed=seed)
        else:
            nib.save(nib.Nifti1Image(image, affine), folder / image_path)
        nib.save(nib.Nifti1Image(mask, affine), folder / mask_path)
        rows.append({"path": image_path, "label": mask_path, "patient_id": f"SYN{seed}-{p:05d}",
                     "sex": sex, "age": age, "race": race, "site": site})
    labels_csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_csv, index=False)
    return SyntheticExport(folder=folder, labels_csv=labels_csv, n_patients=n_patients, n_images=len(rows))
