from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from components.data.ingest import (
    MANIFEST_COLUMNS, IngestSettings, ingest_export, load_manifest,
)
from components.data.labels import age_group, label_rows
from components.data.sources import IN_FLIGHT_BATCHES, CaseJob, convert_in_order, pseudonymise
from components.data.synthetic import generate_export
from components.errors import IngestError

from tests.conftest import SALT, pydicom_export


def _ingest(source: Path, labels: Path, target: Path, **overrides):
    kwargs = dict(source=source, labels_csv=labels, dataset_dir=target, settings=IngestSettings(), salt=SALT)
    report, _ = ingest_export(**(kwargs | overrides))
    return report


def test_manifest_has_the_contract_columns_and_image_facts(small_dataset):
    manifest = pd.read_parquet(small_dataset)
    segmentation_only = {"mask_shape", "mask_spacing", "foreground"}
    assert list(manifest.columns) == [c for c in MANIFEST_COLUMNS if c not in segmentation_only]
    assert manifest["case_id"].is_unique
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest["shape"] == "32x32").all() and (manifest["spacing"] == "0.5x0.5").all()
    assert (manifest["nan_count"] == 0).all()


def test_pixels_survive_the_modality_lut(small_export, small_dataset):
    labels = pd.read_csv(small_export.labels_csv)
    ds = pydicom.dcmread(small_export.folder / labels.loc[0, "path"])
    expected = apply_modality_lut(ds.pixel_array, ds)
    case_id = pseudonymise(ds.SOPInstanceUID, salt=SALT, prefix="C")
    stored = nib.load(small_dataset.parent / "images" / f"{case_id}.nii.gz").get_fdata()
    np.testing.assert_array_equal(stored, expected)
    assert stored.min() < 0  # the rescale intercept (-1024) was applied


def _all_bytes(folder: Path) -> bytes:
    blobs = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            blobs.append(gzip.decompress(data) if path.suffix == ".gz" else data)
    return b"".join(blobs)


def test_no_identifier_reaches_the_dataset(small_export, small_dataset):
    labels = pd.read_csv(small_export.labels_csv)
    everything = _all_bytes(small_dataset.parent)
    for path in labels["path"]:
        ds = pydicom.dcmread(small_export.folder / path)
        for value in (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.SOPInstanceUID):
            assert value.encode() not in everything, f"{value} leaked into the dataset"
    audit = json.loads((small_dataset.parent / "deid_audit.json").read_text())
    assert audit["removed_tags"]["PatientName"] == len(labels)


def test_patient_pseudonyms_are_stable_and_keyed():
    assert pseudonymise("MRN1", salt=SALT, prefix="P") == pseudonymise("MRN1", salt=SALT, prefix="P")
    assert pseudonymise("MRN1", salt=SALT, prefix="P") != pseudonymise("MRN1", salt=b"other", prefix="P")


@pytest.mark.parametrize(("age", "group"), [(20, "<40"), (40, "40-59"), (59.5, "40-59"), (60, "60+"), (float("nan"), "unknown")])
def test_age_groups(age, group):
    assert age_group(age, (40, 60)) == group


@pytest.fixture
def real_export(tmp_path):
    """pydicom's own CT and MR files, with a labels CSV."""
    return pydicom_export(tmp_path / "export", ["CT_small.dcm", "MR_small.dcm"],
                          "path,label,sex,age,site\nCT_small.dcm,1,F,50,a\nMR_small.dcm,0,M,30,b\n")


def test_real_pydicom_files_ingest_with_values_intact(real_export, tmp_path):
    source, labels = real_export
    report = _ingest(source, labels, tmp_path / "data" / "real")
    manifest = pd.read_parquet(report.manifest)
    assert sorted(manifest["modality"]) == ["CT", "MR"]
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(source / name)
        row = manifest[manifest["case_id"] == pseudonymise(ds.SOPInstanceUID, salt=SALT, prefix="C")].iloc[0]
        image = nib.load(report.dataset_dir / row["image"])
        np.testing.assert_array_equal(image.get_fdata(), apply_modality_lut(ds.pixel_array, ds))
        assert row["spacing"] == "x".join(f"{float(s):g}" for s in ds.PixelSpacing)
    everything = _all_bytes(report.dataset_dir)
    assert b"CompressedSamples" not in everything and b"1CT1" not in everything


def _bad_input(source: Path, labels: Path, case: str) -> str:
    """Make one kind of bad input; return the text the error must contain."""
    if case == "missing file":
        labels.write_text(labels.read_text() + "gone.dcm,0,F,50,a\n")
        return f"{labels} row 4: gone.dcm: file not found"
    if case == "not dicom":
        (source / "notes.dcm").write_text("not a dicom file")
        labels.write_text(labels.read_text() + "notes.dcm,0,F,50,a\n")
        return f"{source / 'notes.dcm'}: not a DICOM file"
    if case == "no pixel data":
        shutil.copy(get_testdata_file("rtplan.dcm"), source / "rtplan.dcm")
        labels.write_text(labels.read_text() + "rtplan.dcm,0,F,50,a\n")
        return f"{source / 'rtplan.dcm'}: DICOM without pixel data"
    if case == "truncated":
        data = (source / "CT_small.dcm").read_bytes()
        (source / "cut.dcm").write_bytes(data[: len(data) // 2])
        labels.write_text(labels.read_text() + "cut.dcm,0,F,50,a\n")
        return f"{source / 'cut.dcm'}:"
    if case == "unknown label":
        labels.write_text(labels.read_text().replace("MR_small.dcm,0", "MR_small.dcm,7"))
        return f"{labels} row 3: label '7' not in 0..1"
    if case == "duplicate path":
        labels.write_text(labels.read_text() + "CT_small.dcm,1,F,50,a\n")
        return f"{labels} row 4: duplicate path CT_small.dcm"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing file", "not dicom", "no pixel data", "truncated", "unknown label", "duplicate path"])
def test_bad_input_names_the_file_and_writes_nothing(real_export, tmp_path, case):
    source, labels = real_export
    expected = _bad_input(source, labels, case)
    target = tmp_path / "data" / "real"
    with pytest.raises(IngestError) as info:
        _ingest(source, labels, target)
    assert expected in str(info.value)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [] if target.parent.exists() else True


def test_failed_reingest_keeps_the_previous_dataset(real_export, tmp_path):
    source, labels = real_export
    target = tmp_path / "data" / "real"
    first = _ingest(source, labels, target)
    before = pd.read_parquet(first.manifest)
    _bad_input(source, labels, "missing file")
    with pytest.raises(IngestError):
        _ingest(source, labels, target)
    pd.testing.assert_frame_equal(pd.read_parquet(target / "manifest.parquet"), before)


def test_every_problem_is_reported_at_once(real_export, tmp_path):
    source, labels = real_export
    labels.write_text(labels.read_text() + "a.dcm,0,F,50,a\nb.dcm,0,F,50,a\n")
    with pytest.raises(IngestError) as info:
        _ingest(source, labels, tmp_path / "data" / "x")
    message = str(info.value)
    assert message.startswith("2 problem(s) in the input:")
    assert "a.dcm: file not found" in message and "b.dcm: file not found" in message


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label\nx.dcm,0\n", "missing column(s) path; expected path,label and optionally patient_id,sex,age,race,site"),
        ("", "cannot read labels file"),
    ],
)
def test_malformed_labels_files(real_export, tmp_path, content, message):
    source, labels = real_export
    labels.write_text(content)
    with pytest.raises(IngestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _ingest(source, labels, tmp_path / "data" / "x")


def test_a_manifest_read_for_some_columns_has_those_it_holds_in_its_own_order(small_dataset, tmp_path):
    whole = pd.read_parquet(small_dataset)
    as_csv = tmp_path / "manifest.csv"
    whole.to_csv(as_csv, index=False)
    for path in (small_dataset, as_csv):
        read = load_manifest(path, columns=["label", "case_id", "scanner"])  # no scanner column: left out
        assert list(read.columns) == ["case_id", "label"]
        pd.testing.assert_frame_equal(read, load_manifest(path)[["case_id", "label"]])
    with pytest.raises(IngestError, match="cannot read manifest .*missing.parquet"):
        load_manifest(tmp_path / "missing.parquet", columns=["case_id"])


def test_missing_source_folder(tmp_path):
    with pytest.raises(IngestError, match=r"source folder .*nowhere does not exist or is not a folder"):
        _ingest(tmp_path / "nowhere", tmp_path / "labels.csv", tmp_path / "data" / "x")


def test_the_same_export_gives_the_same_dataset_under_any_key(small_export, tmp_path):
    a = _ingest(small_export.folder, small_export.labels_csv, tmp_path / "a" / "d", salt=b"one")
    b = _ingest(small_export.folder, small_export.labels_csv, tmp_path / "b" / "d", salt=b"two")
    ma, mb = pd.read_parquet(a.manifest), pd.read_parquet(b.manifest)
    assert not set(ma["patient_id"]) & set(mb["patient_id"])  # different keys, different pseudonyms
    assert ma["split"].tolist() == mb["split"].tolist() and ma["sha256"].tolist() == mb["sha256"].tolist()


def test_conversions_stream_in_order_with_a_bounded_number_of_jobs_ahead(tmp_path):
    """The workers get a few batches ahead of the results read, not every job at once (``Executor.map`` would)."""
    export = generate_export(tmp_path / "export", n_patients=160, image_size=8, seed=3)
    paths = pd.read_csv(export.labels_csv)["path"].tolist()
    (tmp_path / "staging" / "images").mkdir(parents=True)
    pulled = []

    def jobs():
        for i, rel in enumerate(paths):
            pulled.append(i)
            yield CaseJob(i, export.folder / rel, rel, "dicom", None, 2, tmp_path / "staging", SALT)

    rows, ahead = [], []
    for result in convert_in_order(jobs(), len(paths), workers=2):
        rows.append(result.row)
        ahead.append(len(pulled) - len(rows))
    bound = IN_FLIGHT_BATCHES * 2 * (len(paths) // 16)  # batches in flight x jobs a batch (a sixteenth here)
    assert rows == list(range(len(paths)))
    assert len(paths) > 2 * bound and max(ahead) <= bound
    assert len(list((tmp_path / "staging" / "images").iterdir())) == len(paths)


def test_label_rows_give_every_row_once_with_its_index_across_chunks():
    """The rows as iterrows gives them, whatever the chunk size: ingest builds the manifest row by row from these."""
    labels = pd.DataFrame({"path": [f"f{i}.dcm" for i in range(7)], "label": [0, 1, 1, 0, 1, 0, 1],
                           "age": [30.5, None, 61, 45, 70, 12, 80]}, index=[0, 1, 2, 4, 5, 8, 9])
    expected = [(i, rec.to_dict()) for i, rec in labels.iterrows()]
    for rows in (1, 3, 7, 1024):
        got = list(label_rows(labels, rows=rows))
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [r["path"] for _, r in got] == [r["path"] for _, r in expected]
        assert [r["label"] for _, r in got] == [r["label"] for _, r in expected]
        np.testing.assert_array_equal([r["age"] for _, r in got], [r["age"] for _, r in expected])
