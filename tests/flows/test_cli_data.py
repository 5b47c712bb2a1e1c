"""``medflow ingest``, ``medflow data versions`` and ``medflow data checkout`` on a real git + DVC workspace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from components.data.synthetic import generate_export
from flows.cli import main


def _commits(root: Path) -> list[str]:
    out = subprocess.run(["git", "log", "--format=%s"], cwd=root, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:-1]


@pytest.fixture
def export(tmp_path_factory):
    """A 40-patient export (outside the workspace) and its first 25 patients as an earlier labels file."""
    made = generate_export(tmp_path_factory.mktemp("export"), n_patients=40, image_size=16, seed=2)
    labels = pd.read_csv(made.labels_csv)
    patients = labels["path"].str.extract(r"(p\d+)_", expand=False)
    labels[patients.isin(patients.drop_duplicates().iloc[:25])].to_csv(made.folder / "early.csv", index=False)
    return made


def _ingest(export, labels: str, *extra: str) -> int:
    return main(["ingest", "--source", str(export.folder), "--format", "dicom", "--labels", str(export.folder / labels),
                 "--dataset", "ward", *extra])


def test_a_second_ingest_of_the_same_export_creates_no_version(workspace, export, capsys):
    assert _ingest(export, "early.csv") == 0
    assert _ingest(export, "early.csv") == 0
    out = capsys.readouterr().out
    assert "(first version)" in out and "(unchanged, no new version)" in out and "converted 0, reused" in out
    assert _commits(workspace) == [f"medflow: data ward version {_version(workspace)[:12]}", "medflow: initialise the DVC project"]
    assert not subprocess.run(["git", "status", "--porcelain"], cwd=workspace, capture_output=True, text=True).stdout


def _version(root: Path) -> str:
    from components.data.versioning import read_version

    return read_version(root / "data" / "ward.dvc")


def test_versions_list_and_checkout_restores_one(workspace, export, capsys):
    assert _ingest(export, "early.csv") == 0
    first = _version(workspace)
    first_manifest = pd.read_parquet(workspace / "data" / "ward" / "manifest.parquet")
    assert _ingest(export, "labels.csv") == 0
    second = _version(workspace)
    assert second != first
    capsys.readouterr()
    assert main(["data", "versions", "--dataset", "ward"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")[1:]
    assert [line[2:].split()[0] for line in lines] == [second, first] and lines[0].startswith("*")
    assert f"cases {len(first_manifest)}" in lines[1]
    assert main(["data", "checkout", first[:10], "--dataset", "ward"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(workspace / "data" / "ward" / "manifest.parquet"), first_manifest)
    assert _version(workspace) == first
    assert main(["data", "checkout", "nope", "--dataset", "ward"]) == 1
    assert f"ward.dvc: no data version 'nope'; known versions: {second[:12]}, {first[:12]}" in capsys.readouterr().err


def test_bad_rows_exit_2_naming_each_and_skip_bad_records_them(workspace, export, capsys):
    with (export.folder / "early.csv").open("a") as f:
        f.write("nowhere.dcm,0,F,50,W,a\n")
    assert _ingest(export, "early.csv") == 2  # bad input data: every problem listed, no version written
    assert "nowhere.dcm: file not found" in capsys.readouterr().err
    assert not (workspace / "data" / "ward").exists()
    assert _ingest(export, "early.csv", "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out and "skipped nowhere.dcm:" in out


def test_no_identifier_of_the_export_reaches_data(workspace, export):
    import gzip

    assert _ingest(export, "labels.csv") == 0
    everything = b"".join(
        gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        for p in (workspace / "data").rglob("*") if p.is_file()
    )
    for path in pd.read_csv(export.labels_csv)["path"]:
        ds = pydicom.dcmread(export.folder / path, stop_before_pixels=True)
        for value in (str(ds.PatientName), ds.PatientID, ds.SOPInstanceUID, Path(path).stem):
            assert value.encode() not in everything


def test_a_first_ingest_that_fails_leaves_the_folder_as_it_found_it(workspace, export, capsys):
    """It used to leave .medflow/ with the pseudonym key, the lock and the ingest report behind."""
    (workspace / "notes.txt").write_text("the user's own file\n")
    with (export.folder / "early.csv").open("a") as f:
        f.write("nowhere.dcm,0,F,50,W,a\n")
    assert _ingest(export, "early.csv") == 2
    assert "nowhere.dcm: file not found" in capsys.readouterr().err
    assert sorted(p.name for p in workspace.iterdir()) == ["notes.txt"]

    assert _ingest(export, "labels.csv") == 0  # a first data version: from now on a failure keeps the workspace
    made = sorted(p.name for p in workspace.iterdir())
    assert _ingest(export, "early.csv") == 2
    assert sorted(p.name for p in workspace.iterdir()) == made
    assert (workspace / ".medflow" / "secrets" / "pseudonym.key").is_file()


def test_a_missing_source_or_labels_file_is_refused_before_anything_is_written(workspace, export, capsys):
    assert main(["ingest", "--source", str(workspace / "nowhere"), "--format", "dicom"]) == 1
    assert f"the source folder {workspace / 'nowhere'} does not exist" in capsys.readouterr().err
    (workspace / "empty").mkdir()
    assert main(["ingest", "--source", "empty", "--format", "png"]) == 1
    assert "the labels file empty/labels.csv does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in workspace.iterdir()) == ["empty"]


def test_a_source_without_a_format_is_refused_not_replaced_by_the_demo(workspace, export, capsys):
    """The demo config's format is the synthetic generator: --source alone used to ingest the demo instead."""
    assert main(["ingest", "--source", str(export.folder)]) == 1
    assert "data.format is 'synthetic' (the demo generator, which reads no source)" in capsys.readouterr().err
    assert list(workspace.iterdir()) == []


def test_a_workspace_whose_dvc_cache_hard_links_its_files_keeps_every_version_intact(workspace, export):
    """DVC's large-dataset set-up (``cache.type hardlink,copy``, BENCHMARKS.md): the dataset's files are the
    cache's own, read-only. A second ingest (which hard-links the unchanged files into a new folder) and a
    checkout of the first version change no cached file: each still hashes to the md5 that names it."""
    import hashlib

    from components.data.versioning import ensure_repository

    ensure_repository(workspace)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "config", "cache.type", "hardlink,copy"], cwd=workspace,
                   check=True)
    assert _ingest(export, "early.csv") == 0
    first = _version(workspace)
    first_manifest = pd.read_parquet(workspace / "data" / "ward" / "manifest.parquet")
    images = [p for p in (workspace / "data" / "ward").rglob("*.nii*")]
    assert images and all(p.stat().st_nlink >= 2 and not p.stat().st_mode & 0o222 for p in images)
    assert _ingest(export, "labels.csv") == 0
    assert _version(workspace) != first
    assert main(["data", "checkout", first[:10], "--dataset", "ward"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(workspace / "data" / "ward" / "manifest.parquet"), first_manifest)
    cached = [p for p in (workspace / ".dvc" / "cache" / "files" / "md5").rglob("*") if p.is_file()]
    assert len(cached) > len(images)
    for path in cached:
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        assert digest == path.parent.name + path.name.removesuffix(".dir"), path
