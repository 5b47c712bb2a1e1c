"""A synthetic segmentation export for the demo: NIfTI volumes, their masks and a labels CSV.

Each volume is smooth tissue texture with one to three bright ellipsoidal
lesions; the mask marks every voxel inside a lesion (label 1). As in the
classification demo, patients carry ``sex``, ``age``, ``race`` and a ``site`` with
its own contrast and noise, and ``bias`` fades the lesions of women (at 1 they
are a quarter as bright), so a trained model segments them measurably worse.
``depth`` 0 gives 2D images, otherwise volumes of that many slices.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from components.data.synthetic import BIASED_GROUP, RACES, SITES, SyntheticExport
from components.errors import ConfigError

LESION_AMPLITUDE = 0.8
VOXEL_MM = (0.8, 0.8, 2.0)


def make_volume(
    rng: np.random.Generator, *, shape: tuple[int, ...], lesion: float, contrast: float, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32, about [0, 1]) and its mask (uint8, 1 inside a lesion), of ``shape``."""
    tissue = ndimage.gaussian_filter(rng.normal(size=shape), sigma=[s / 12 for s in shape])
    tissue = 0.35 + contrast * 0.15 * tissue / (tissue.std() + 1e-8)
    grid = np.indices(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        centre = [rng.uniform(0.25 * s, 0.75 * s) for s in shape]
        radii = [rng.uniform(0.08, 0.16) * s for s in shape]
        inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0
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
) -> SyntheticExport:
    """Write NIfTI images and masks and ``labels.csv`` (``path,label,patient_id,sex,age,race,site``).

    Args:
        folder: output folder; ``images/``, ``masks/`` and ``labels.csv`` are written inside.
        n_patients: one volume per patient.
        image_size: rows and columns of each slice.
        depth: slices per volume; 0 writes 2D images.
        bias: in [0, 1]; how much fainter the lesions of women are.
        seed: random seed; the same seed gives the same export.
    """
    if not 0.0 <= bias <= 1.0:
        raise ConfigError(f"bias must be in [0, 1], got {bias}")
    rng = np.random.default_rng(seed)
    shape = (image_size, image_size, depth) if depth else (image_size, image_size)
    affine = np.diag([*VOXEL_MM[: len(shape)], *([1.0] * (4 - len(shape)))])
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
        nib.save(nib.Nifti1Image(image, affine), folder / image_path)
        nib.save(nib.Nifti1Image(mask, affine), folder / mask_path)
        rows.append({"path": image_path, "label": mask_path, "patient_id": f"SYN{seed}-{p:05d}",
                     "sex": sex, "age": age, "race": race, "site": site})
    labels_csv = folder / "labels.csv"
    pd.DataFrame(rows).to_csv(labels_csv, index=False)
    return SyntheticExport(folder=folder, labels_csv=labels_csv, n_patients=n_patients, n_images=len(rows))
