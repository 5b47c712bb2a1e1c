"""A synthetic hospital export for the demo: DICOM files plus a labels CSV.

Each 2D single-channel image shows smooth tissue texture; label 1 adds a faint
round lesion. Patients carry ``sex``, ``age``, ``race`` and an acquisition
``site``; each site has its own contrast and noise. The ``bias`` knob fades the
lesions of one group (sex F): at 0 every group looks alike, at 1 their lesions
are a quarter as bright, so a trained model is measurably worse for women.
The DICOM headers hold made-up patient names and IDs, as real exports do, so
that de-identification has something to remove.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from components.errors import ConfigError

SITES = {"site-a": (1.0, 0.06), "site-b": (0.8, 0.10), "site-c": (1.2, 0.08)}
RACES = ("asian", "black", "white", "other")
FIRST_NAMES = ("Jane", "John", "Maria", "Wei", "Amara", "Lars", "Priya", "Tomas")
LAST_NAMES = ("Doe", "Smith", "Garcia", "Chen", "Okafor", "Nilsson", "Patel", "Novak")
RESCALE_INTERCEPT = -1024.0
LESION_AMPLITUDE = 0.55
BIASED_GROUP = ("sex", "F")


@dataclass(frozen=True)
class SyntheticExport:
    """Where the export was written and how big it is."""

    folder: Path
    labels_csv: Path
    n_patients: int
    n_images: int


def make_image(
    rng: np.random.Generator, *, size: int, lesion: float, contrast: float, noise: float
) -> np.ndarray:
    """One image, float32 in about [0, 1], layout (rows, cols).

    Args:
        rng: random source.
        size: rows and columns, pixels.
        lesion: peak brightness of the lesion added to the tissue; 0 for none.
        contrast: site gain applied to the tissue.
        noise: standard deviation of the site's Gaussian noise.
    """
    tissue = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=size / 12)
    tissue = 0.35 + contrast * 0.15 * tissue / (tissue.std() + 1e-8)
    if lesion > 0:
        radius = rng.uniform(0.06, 0.10) * size
        cy, cx = rng.uniform(0.25 * size, 0.75 * size, size=2)
        yy, xx = np.mgrid[:size, :size]
        tissue = tissue + lesion * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    return (tissue + rng.normal(scale=noise, size=tissue.shape)).astype(np.float32)


def write_dicom(path: Path, image: np.ndarray, *, patient: dict, index: int, seed: int) -> None:
    """Write ``image`` (float, about [0, 1]) as a CR DICOM file with stored values + rescale."""
    stored = np.clip(image * 1000 + 1024, 0, 4095).astype(np.uint16)
    entropy = [str(seed), patient["mrn"], str(index)]
    sop_uid = generate_uid(entropy_srcs=[*entropy, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.PatientName = patient["name"]
    ds.PatientID = patient["mrn"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.PatientSex = patient["sex"]
    ds.AccessionNumber = f"ACC{patient['mrn'][3:]}{index}"
    ds.InstitutionName = f"General Hospital {patient['site']}"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.Modality = "CR"
    ds.StudyDate = "20260101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.PixelData = stored.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def generate_export(
    folder: Path,
    *,
    n_patients: int = 160,
    image_size: int = 64,
    bias: float = 0.0,
    seed: int = 7,
    max_images_per_patient: int = 3,
) -> SyntheticExport:
    """Write a synthetic DICOM export and its labels CSV (``path,label,sex,age,race,site``).

    Args:
        folder: output folder; ``images/`` and ``labels.csv`` are written inside.
        n_patients: number of patients; each has 1 to ``max_images_per_patient`` images.
        image_size: rows and columns of each image, pixels.
        bias: in [0, 1]; how much fainter the lesions of women are (1: a quarter as bright).
        seed: random seed; the same seed gives the same export.
        max_images_per_patient: most images one patient has.
    """
    if not 0.0 <= bias <= 1.0:
        raise ConfigError(f"bias must be in [0, 1], got {bias}")
    rng = np.random.default_rng(seed)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows, mrns = [], set()
    for p in range(n_patients):
        sex = str(rng.choice(["F", "M"]))
        site = str(rng.choice(list(SITES)))
        age = int(rng.integers(20, 90))
        mrn = int(rng.integers(10**6, 10**7))
        while mrn in mrns:  # two patients never share a record number (nor, through it, their UIDs)
            mrn = mrn + 1 if mrn + 1 < 10**7 else 10**6
        mrns.add(mrn)
        patient = {
            "mrn": f"MRN{mrn}",
            "name": f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
            "birth_date": f"{2026 - age}0{rng.integers(1, 10)}1{rng.integers(0, 10)}",
            "sex": sex,
            "site": site,
        }
        race = str(rng.choice(RACES))
        faint = 1.0 - 0.75 * bias if (BIASED_GROUP[0], sex) == BIASED_GROUP else 1.0
        contrast, noise = SITES[site]
        for k in range(int(rng.integers(1, max_images_per_patient + 1))):
            label = int(rng.random() < 0.4)
            image = make_image(
                rng, size=image_size, lesion=LESION_AMPLITUDE * faint * label, contrast=contrast, noise=noise
            )
            relpath = f"images/p{p:04d}_{k}.dcm"
            write_dicom(folder / relpath, image, patient=patient, index=k, seed=seed)
            rows.append({"path": relpath, "label": label, "sex": sex, "age": age, "race": race, "site": site})
    labels_csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_csv, index=False)
    return SyntheticExport(folder=folder, labels_csv=labels_csv, n_patients=n_patients, n_images=len(rows))
