"""Incremental ingest: unchanged inputs do no work; a grown export keeps every patient's split; --skip-bad."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys

import pandas as pd
import pydicom
import pytest

from components.data.ingest import IngestSettings, ingest_export, save_state, write_ingest_report
from components.data.incremental import STATE_VERSION, new_state
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
    target, state = tmp_path / "data" / "d", tmp_path / "state.sqlite"
    first = _run(source, early, target, state)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    again = _run(source, early, target, state)
    assert first.converted == first.n_cases and not first.unchanged
    assert again.unchanged and again.converted == 0 and again.n_cases == first.n_cases
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before  # nothing rewritten


def test_a_grown_export_converts_only_new_files_and_keeps_every_split(grown_export, tmp_path):
    source, early, full = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.sqlite"
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
    target, state = tmp_path / "data" / "d", tmp_path / "state.sqlite"
    _run(source, early, target, state)
    table = pd.read_csv(early)
    table.loc[0, "label"] = 1 - table.loc[0, "label"]
    table.to_csv(early, index=False)
    again = _run(source, early, target, state)
    assert not again.unchanged and again.converted == 0
    assert pd.read_parquet(again.manifest)["label"].iloc[0] == table.loc[0, "label"]


def test_a_changed_file_is_converted_again(grown_export, tmp_path):
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "state.sqlite"
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
    target, state = tmp_path / "data" / "d", tmp_path / "state.sqlite"
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
        _run(source, early, target, tmp_path / "s.sqlite")
    report = _run(source, early, target, tmp_path / "s.sqlite", skip_bad=True)
    assert [p for p, _ in report.skipped] == ["broken.dcm", "missing.dcm"]
    assert "not a DICOM file" in report.skipped[0][1] and "file not found" in report.skipped[1][1]
    written = json.loads(write_ingest_report(report, tmp_path / "report.json").read_text())
    assert written["skipped"][0]["path"] == "broken.dcm" and written["n_cases"] == report.n_cases


def test_parallel_conversion_gives_the_same_dataset(grown_export, tmp_path):
    source, early, _ = grown_export
    one = _run(source, early, tmp_path / "a" / "d", tmp_path / "a.sqlite", workers=1)
    two = _run(source, early, tmp_path / "b" / "d", tmp_path / "b.sqlite", workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet(one.manifest), pd.read_parquet(two.manifest))


def test_the_state_records_every_file_and_case_and_leaves_no_draft_behind(grown_export, tmp_path):
    source, early, _ = grown_export
    state = tmp_path / "states" / "d.sqlite"
    first = _run(source, early, tmp_path / "data" / "d", state)
    with sqlite3.connect(state) as db:
        files = dict(db.execute("SELECT path, digest FROM hashes"))
        cases = db.execute("SELECT path, case_id, removed_tags, input FROM cases").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta"))
    paths = pd.read_csv(early)["path"]
    assert set(files) == {str(source / p) for p in paths} and len(cases) == first.n_cases
    one = source / paths.iloc[0]
    assert files[str(one)] == hashlib.sha256(one.read_bytes()).hexdigest()
    manifest = pd.read_parquet(first.manifest)
    assert {c[1] for c in cases} == set(manifest["case_id"]) and all(c[3] == files[str(source / c[0])] for c in cases)
    assert {"PatientID", "PatientName"} <= set(dict((c[0], c[2]) for c in cases)[paths.iloc[0]].split("|"))
    assert meta["data_version"] == "v" and meta["version"] == str(STATE_VERSION)
    written = (tmp_path / "data" / "d" / "manifest.parquet").read_bytes()
    assert meta["manifest_sha256"] == hashlib.sha256(written).hexdigest()
    assert sorted(p.name for p in state.parent.iterdir()) == ["d.sqlite"]


def test_a_version_1_json_state_is_carried_over_and_its_cases_reused(grown_export, tmp_path):
    """An ingest made before the state moved to SQLite: its cases are reused, the manifest is built again, and
    the JSON file gives way to the new state."""
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "d.sqlite"
    first = _run(source, early, target, state)
    with sqlite3.connect(state) as db:
        legacy = {"version": 1, "data_version": "v", "fingerprint": "of the old format",
                  "hashes": {p: [s, m, d] for p, s, m, d in db.execute("SELECT * FROM hashes")},
                  "cases": {p: {"case_id": c, "removed_tags": t.split("|"), "input": i, "mask_input": m}
                            for p, c, t, i, m in db.execute("SELECT * FROM cases")}}
    state.unlink()
    state.with_suffix(".json").write_text(json.dumps(legacy))
    before = pd.read_parquet(first.manifest)
    again = _run(source, early, target, state)
    assert not again.unchanged and (again.converted, again.reused) == (0, first.n_cases)
    pd.testing.assert_frame_equal(pd.read_parquet(again.manifest), before)
    assert not state.with_suffix(".json").exists() and _run(source, early, target, state).unchanged


@pytest.mark.parametrize("content", [b"not a database", b""])
def test_an_unreadable_state_converts_everything_again(grown_export, tmp_path, content):
    source, early, _ = grown_export
    target, state = tmp_path / "data" / "d", tmp_path / "d.sqlite"
    first = _run(source, early, target, state)
    state.write_bytes(content)
    again = _run(source, early, target, state)
    assert (again.converted, again.reused) == (first.n_cases, 0)
    pd.testing.assert_frame_equal(pd.read_parquet(again.manifest), pd.read_parquet(first.manifest))


def test_a_draft_left_by_a_killed_ingest_is_removed_by_the_next(tmp_path):
    """A draft's object is removed when it goes, but not after SIGKILL: the next ingest on this host removes the
    drafts of processes that no longer run, and leaves those of running processes, of other hosts (a shared
    volume), and the unnamed ones of older versions."""
    folder, host = tmp_path / "ingest", socket.gethostname()
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = folder / f".ingest-{host}-{gone.stdout.strip()}-a1b2c3d4.draft"
    alive = folder / f".ingest-{host}-{os.getpid()}-e5f6g7h8.draft"
    elsewhere = folder / f".ingest-another-host-{gone.stdout.strip()}-i9j0k1l2.draft"
    unnamed = folder / ".ingest-m3n4o5p6.draft"
    saved = folder / "d.sqlite"
    for path in (dead, alive, elsewhere, unnamed, saved):
        path.write_bytes(b"")
    state = new_state(folder)
    assert state.path.name.startswith(f".ingest-{host}-{os.getpid()}-") and state.path.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (alive, elsewhere, unnamed, saved,
                                                                                  state.path))
    draft = state.path
    del state
    assert not draft.exists()
