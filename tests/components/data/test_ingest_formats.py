"""Ingest of NIfTI, PNG and DICOM-series sources, and segmentation masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from nibabel.testing import data_path as NIBABEL_DATA
from PIL import Image

from components.data.ingest import IngestSettings, ingest_export
from components.data.sources import CaseJob, convert_case, image_facts
from components.errors import IngestError

from tests.components.data.conftest import traced_peak
from tests.conftest import SALT, pydicom_export

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _ingest(source: Path, labels: Path, target: Path, settings: IngestSettings, **kwargs):
    report, _ = ingest_export(source=source, labels_csv=labels, dataset_dir=target, settings=settings, salt=SALT, **kwargs)
    return report


def test_nifti_files_keep_their_voxels_and_affine(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    names = ["anatomical.nii", "standard.nii.gz"]
    for name in names:
        shutil.copy(Path(NIBABEL_DATA) / name, source / name)
    labels = source / "labels.csv"
    labels.write_text("path,label,patient_id\nanatomical.nii,1,p1\nstandard.nii.gz,0,p2\n")
    report = _ingest(source, labels, tmp_path / "data" / "n", IngestSettings(fmt="nifti"))
    manifest = pd.read_parquet(report.manifest)
    for name, (_, row) in zip(names, manifest.iterrows()):
        original = nib.load(source / name)
        stored = nib.load(report.dataset_dir / row["image"])
        np.testing.assert_array_equal(stored.get_fdata(), original.get_fdata())
        np.testing.assert_allclose(stored.affine, original.affine, atol=1e-5)
        assert row["shape"] == "x".join(str(s) for s in original.shape)


def test_png_and_jpeg_become_single_channel_images(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    colour = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(grey).save(source / "grey.png")
    Image.fromarray(colour).save(source / "colour.png")
    labels = source / "labels.csv"
    labels.write_text("path,label,patient_id\ngrey.png,0,p1\ncolour.png,1,p2\n")
    report = _ingest(source, labels, tmp_path / "data" / "p", IngestSettings(fmt="png"))
    manifest = pd.read_parquet(report.manifest).set_index("label")
    stored = {k: nib.load(report.dataset_dir / manifest.at[k, "image"]).get_fdata() for k in (0, 1)}
    np.testing.assert_array_equal(stored[0], grey)  # rows x cols, as the picture is stored
    np.testing.assert_array_equal(stored[1], np.asarray(Image.fromarray(colour).convert("L")))


def test_non_dicom_sources_need_patient_ids(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    labels = source / "labels.csv"
    labels.write_text("path,label\na.png,0\n")
    with pytest.raises(IngestError, match=r"missing column\(s\) patient_id; .*patient_id is required for png sources"):
        _ingest(source, labels, tmp_path / "data" / "p", IngestSettings(fmt="png"))


def test_a_series_folder_is_one_case(tmp_path):
    source = tmp_path / "export"
    shutil.copytree(TEST_FILES / "dicomdirtests" / "98892001" / "CT5N", source / "patient1" / "ct")
    shutil.copy(TEST_FILES / "CT_small.dcm", source / "ct_small.dcm")
    labels = source / "labels.csv"
    labels.write_text("path,label\npatient1/ct,1\nct_small.dcm,0\n")
    report = _ingest(source, labels, tmp_path / "data" / "s", IngestSettings())
    manifest = pd.read_parquet(report.manifest)
    assert manifest["shape"].tolist() == ["16x16x5", "128x128"]
    assert manifest["spacing"].iloc[0].endswith("x2.5")


def _volume_pair(folder: Path, name: str, *, mask_shape=(8, 8, 4), mask_affine=None) -> None:
    rng = np.random.default_rng(len(name))
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 4)).astype(np.float32), affine), folder / f"{name}.nii.gz")
    mask = (rng.random(mask_shape) > 0.7).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, affine if mask_affine is None else mask_affine), folder / f"{name}_seg.nii.gz")


def test_image_facts_equal_numpys_across_chunks(monkeypatch):
    import hashlib  # noqa: PLC0415

    import components.data.sources as sources  # noqa: PLC0415 (its chunk size, made small)

    monkeypatch.setattr(sources, "FACT_CHUNK", 1000)  # 10 chunks and a partial one
    rng = np.random.default_rng(3)
    array = rng.normal(40, 12, size=(50, 41, 5)).astype(np.float32)
    array[3, 4, 0], array[30, 2, 4], array[7, 7, 2] = np.nan, np.inf, -np.inf
    facts = image_facts(array, np.diag([0.5, 0.5, 2.0, 1.0]))
    finite = array[np.isfinite(array)].astype(np.float64)
    assert (facts["shape"], facts["spacing"], facts["dtype"]) == ("50x41x5", "0.5x0.5x2", "float32")
    assert (facts["nan_count"], facts["inf_count"]) == (1, 2)
    assert (facts["min"], facts["max"]) == (finite.min(), finite.max())
    assert facts["mean"] == pytest.approx(finite.mean(), rel=1e-12)
    assert facts["std"] == pytest.approx(finite.std(), rel=1e-12)
    assert facts["sha256"] == hashlib.sha256(array.tobytes()).hexdigest()
    empty = image_facts(np.full((3, 3), np.nan, dtype=np.float32), np.eye(4))
    assert empty["nan_count"] == 9 and all(np.isnan(empty[k]) for k in ("min", "max", "mean", "std"))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, bool, np.int16, np.float32])
@pytest.mark.parametrize("values", [[0, 1], [0, 2, 7], [-1, 0]])
def test_a_masks_bad_values_are_those_numpys_unique_finds_outside_the_classes(dtype, values):
    from components.data.sources import bad_mask_values  # noqa: PLC0415

    mask = np.random.default_rng(1).choice(values, size=(40, 30, 6)).astype(dtype)[:, ::2]  # a strided view too
    expected = [float(v) for v in np.unique(mask) if not 0 <= v < 2]
    assert bad_mask_values(mask, 2) == expected
    if dtype is np.float32:
        assert bad_mask_values(mask + 0.5, 3) == [float(v) + 0.5 for v in np.unique(mask)]  # not whole numbers


def test_a_full_width_ct_series_converts_in_about_its_volumes_memory(large_ct_series, tmp_path):
    """Reading, the image facts and the NIfTI write each stay within a slice or a chunk beyond the volume."""
    folder, expected = large_ct_series
    out = tmp_path / "dataset"
    (out / "images").mkdir(parents=True)
    job = CaseJob(row=0, path=folder, rel_path="series", fmt="dicom", mask=None, num_classes=2, out_dir=out, salt=SALT)
    converted, peak = traced_peak(convert_case, job)
    stored = nib.load(out / converted.facts["image"]).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(stored, expected)
    assert converted.facts["mean"] == pytest.approx(expected.astype(np.float64).mean(), rel=1e-9)
    # before: 3.1 volumes (the reader's; the facts' copies came after it had let go of its own)
    assert peak < 1.4 * expected.nbytes, f"peak {peak / 2**20:.1f} MiB for a {expected.nbytes / 2**20:.1f} MiB volume"


def test_segmentation_masks_are_stored_on_their_images_grid(tmp_path):
    source = tmp_path / "export"
    source.mkdir()
    for name in ("a", "b", "c"):
        _volume_pair(source, name)
    labels = source / "labels.csv"
    labels.write_text("path,label,patient_id\n" + "".join(f"{n}.nii.gz,{n}_seg.nii.gz,p{n}\n" for n in "abc"))
    report = _ingest(source, labels, tmp_path / "data" / "seg", IngestSettings(fmt="nifti", task="segmentation"))
    manifest = pd.read_parquet(report.manifest)
    assert (manifest["label"].str.startswith("labels/")).all()
    assert (manifest["mask_shape"] == manifest["shape"]).all()
    for _, row in manifest.iterrows():
        stored = nib.load(report.dataset_dir / row["label"])
        assert stored.get_data_dtype() == np.uint8
        assert row["foreground"] == pytest.approx(float((stored.get_fdata() > 0).mean()))


@pytest.mark.parametrize(
    ("mask_shape", "mask_affine", "message"),
    [
        ((8, 8, 3), None, "image 8x8x4 at 0.8x0.8x2 mm, mask 8x8x3 at 0.8x0.8x2 mm"),
        ((8, 8, 4), np.diag([1.0, 1.0, 2.0, 1.0]), "image 8x8x4 at 0.8x0.8x2 mm, mask 8x8x4 at 1x1x2 mm (same shape, different affine)"),
    ],
)
def test_a_mask_with_other_geometry_is_named(tmp_path, mask_shape, mask_affine, message):
    source = tmp_path / "export"
    source.mkdir()
    _volume_pair(source, "a", mask_shape=mask_shape, mask_affine=mask_affine)
    labels = source / "labels.csv"
    labels.write_text("path,label,patient_id\na.nii.gz,a_seg.nii.gz,p1\n")
    with pytest.raises(IngestError) as info:
        _ingest(source, labels, tmp_path / "data" / "seg", IngestSettings(fmt="nifti", task="segmentation"))
    assert f"{source / 'a_seg.nii.gz'}: mask geometry differs from its image a.nii.gz: {message}" in str(info.value)
    assert not (tmp_path / "data" / "seg").exists()


REAL_FILES = [
    "CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_2k_lossless.dcm", "693_J2KR.dcm", "JPEG-LL.dcm",
    "SC_rgb_rle.dcm", "OBXXXX1A_rle_2frame.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "gdcm-US-ALOKA-16.dcm",
]


def test_real_files_in_many_syntaxes_ingest_and_no_name_or_id_reaches_data(tmp_path):
    import gzip

    rows = [f"{name},{i % 2},fallback{i}" for i, name in enumerate([*REAL_FILES, "series"])]
    source, labels = pydicom_export(tmp_path / "export", REAL_FILES, "path,label,patient_id\n" + "\n".join(rows) + "\n")
    shutil.copytree(TEST_FILES / "dicomdirtests" / "98892001" / "CT5N", source / "series")
    report = _ingest(source, labels, tmp_path / "data" / "real", IngestSettings())
    assert report.n_cases == len(REAL_FILES) + 1
    everything = b"".join(
        gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        for p in (tmp_path / "data").rglob("*") if p.is_file()
    )
    identifiers = set()
    for path in [*(source / n for n in REAL_FILES), *(source / "series").iterdir()]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.get("PatientName", "")), str(ds.get("PatientID", "")), str(ds.get("SOPInstanceUID", ""))}
    identifiers = {i for i in identifiers if len(i) >= 4}
    assert identifiers and not [i for i in identifiers if i.encode() in everything]


def test_the_same_instance_listed_twice_is_named(tmp_path):
    source, labels = pydicom_export(tmp_path / "export", ["MR_small.dcm", "MR_small_RLE.dcm"],
                                    "path,label\nMR_small.dcm,0\nMR_small_RLE.dcm,0\n")
    with pytest.raises(IngestError) as info:
        _ingest(source, labels, tmp_path / "data" / "d", IngestSettings())
    assert f"{labels} row 3: MR_small_RLE.dcm is the same image as row 2 (MR_small.dcm)" in str(info.value)


@pytest.mark.parametrize(("array", "name"), [
    (np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32), "image.nii.gz"),
    (np.random.default_rng(1).integers(0, 3, size=(20, 16, 8)).astype(np.uint8), "mask.nii.gz"),
    (np.arange(12, dtype=np.float32).reshape(3, 4), "plain.nii"),
])
def test_a_converted_image_is_written_byte_for_byte_as_nibabel_writes_it(tmp_path, monkeypatch, array, name):
    """One compressed write for an image up to ONE_WRITE_BYTES, nibabel's stream beyond: the same file either way
    (so a dataset's DVC hashes do not change with the path taken)."""
    from components.data import sources  # noqa: PLC0415

    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(array, affine), tmp_path / f"nibabel-{name}")
    expected = (tmp_path / f"nibabel-{name}").read_bytes()
    streamed = []
    monkeypatch.setattr(sources.nib, "save", lambda image, path: streamed.append(path))
    sources.save_nifti(nib.Nifti1Image(array, affine), tmp_path / name)
    if name.endswith(".gz"):
        assert streamed == [] and (tmp_path / name).read_bytes() == expected
    monkeypatch.undo()
    monkeypatch.setattr(sources, "ONE_WRITE_BYTES", array.nbytes - 1)  # a larger image is streamed by nibabel
    sources.save_nifti(nib.Nifti1Image(array, affine), tmp_path / f"large-{name}")
    assert (tmp_path / f"large-{name}").read_bytes() == expected
