"""Incremental ingest: unchanged inputs do no work; a grown export keeps every patient's split; --skip-bad."""

from __future__ import annotations

import json

import pandas as pd
import pydicom
import pytest

from components.data.ingest import IngestSettings, ingest_export, save_state, write_ingest_report
from components.data.synthetic import generate_export
from components.errors import IngestError

from tests.conftest import SALT


@pytest.fixture
def grown_export(tmp_path):
    """An export of 80 patients, and its first 50 patients as the 'earlier' export."""
    full = generate_export(tmp_path / "full", n_patients=80, image_size=16, seed=5)
    labels = pd.read_csv(full.labels_csv)
    early_patients = labels["path"].str.extract(r"(p\d+)_", expand=False).drop_duplicates().iloc[:50]
    early = full.folder / "labels-early.csv"
    labels[labels["path"].str.extract(r"(p\d+)_", expand=False).isin(early_patients)].to_csv(early, index=False)
    return full.folder, early, full.labels_csv


def _run(source, labels, target, state_file, **kwargs):
    report, state = ingest_export(
        source=source, labels_csv=labels, dataset_dir=target, settings=IngestSettings(), salt=SALT,
        state_file=state_file, **kwargs,
    )
    save_state(state_file, state, data_version="v")
    return report


def test_unchanged_inputs_do_no_work(grown_export, tmp_path):
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.json"
    first = _run(source, early, target, state)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    again = _run(source, early, target, state)
    assert first.converted == first.n_cases and not first.unchanged
    assert again.unchanged and again.converted == 0 and again.n_cases == first.n_cases
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before  # nothing rewritten


def test_a_grown_export_converts_only_new_files_and_keeps_every_split(grown_export, tmp_path):
    source, early, full = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.json"
    first = _run(source, early, target, state)
    splits_before = pd.read_parquet(first.manifest).set_index("case_id")["split"]
    grown = _run(source, full, target, state)
    manifest = pd.read_parquet(grown.manifest).set_index("case_id")
    assert first.n_patients == 50 and grown.n_patients == 80
    assert grown.reused == first.n_cases and grown.converted == len(manifest) - first.n_cases > 0
    pd.testing.assert_series_equal(manifest.loc[splits_before.index, "split"], splits_before)
    assert set(manifest["split"]) == {"train", "val", "test"}
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()


def test_a_changed_label_reuses_the_images_and_changes_the_manifest(grown_export, tmp_path):
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.json"
    _run(source, early, target, state)
    table = pd.read_csv(early)
    table.loc[0, "label"] = 1 - table.loc[0, "label"]
    table.to_csv(early, index=False)
    again = _run(source, early, target, state)
    assert not again.unchanged and again.converted == 0
    assert pd.read_parquet(again.manifest)["label"].iloc[0] == table.loc[0, "label"]


def test_a_changed_file_is_converted_again(grown_export, tmp_path):
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.json"
    first = _run(source, early, target, state)
    first_path = source / pd.read_csv(early)["path"].iloc[0]
    scan = pydicom.dcmread(first_path)
    scan.PixelData = (scan.pixel_array[::-1].copy()).tobytes()  # new pixels, the same instance
    scan.save_as(first_path)
    again = _run(source, early, target, state)
    assert (again.converted, again.reused) == (1, first.n_cases - 1)
    manifest = pd.read_parquet(target / "manifest.parquet")
    assert manifest["case_id"].is_unique and len(manifest) == first.n_cases


def test_a_file_changed_into_another_rows_image_is_refused_as_the_same_image(grown_export, tmp_path):
    """The changed row's case would be the unchanged (reused) row's: refused, as two rows of one new export are."""
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.json"
    _run(source, early, target, state)
    paths = pd.read_csv(early)["path"]
    (source / paths.iloc[0]).write_bytes((source / paths.iloc[1]).read_bytes())
    with pytest.raises(IngestError, match=rf"row 3: {paths.iloc[1]} is the same image as row 2 \({paths.iloc[0]}\)"):
        _run(source, early, target, state)


def test_skip_bad_ingests_the_rest_and_records_why(grown_export, tmp_path):
    source, early, _ = grown_export
    (source / "broken.dcm").write_text("not dicom")
    with early.open("a") as f:
        f.write("broken.dcm,0,F,50,W,a\nmissing.dcm,1,M,40,B,a\n")
    target = tmp_path / "data" / "d"
    with pytest.raises(IngestError, match=r"^2 problem\(s\) in the input"):
        _run(source, early, target, tmp_path / "s.json")
    report = _run(source, early, target, tmp_path / "s.json", skip_bad=True)
    assert [p for p, _ in report.skipped] == ["broken.dcm", "missing.dcm"]
    assert "not a DICOM file" in report.skipped[0][1] and "file not found" in report.skipped[1][1]
    written = json.loads(write_ingest_report(report, tmp_path / "report.json").read_text())
    assert written["skipped"][0]["path"] == "broken.dcm" and written["n_cases"] == report.n_cases


def test_parallel_conversion_gives_the_same_dataset(grown_export, tmp_path):
    source, early, _ = grown_export
    one = _run(source, early, tmp_path / "a" / "d", tmp_path / "a.json", workers=1)
    two = _run(source, early, tmp_path / "b" / "d", tmp_path / "b.json", workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet(one.manifest), pd.read_parquet(two.manifest))
