"""A disk that fills up while a dataset is written: a real, small tmpfs (mounting needs root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from components.data.ingest import IngestSettings, ingest_export
from components.data.synthetic import generate_export
from components.errors import IngestError
from tests.conftest import SALT


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A 400 KiB tmpfs: room for one small dataset, not for a grown one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_the_previous_version_and_leaves_no_partial_one(small_disk, tmp_path):
    target = small_disk / "data" / "demo"
    small = generate_export(tmp_path / "small", n_patients=20, image_size=32, seed=3)
    first, _ = ingest_export(source=small.folder, labels_csv=small.labels_csv, dataset_dir=target,
                             settings=IngestSettings(), salt=SALT)
    before = (target / "manifest.parquet").read_bytes()
    grown = generate_export(tmp_path / "grown", n_patients=600, image_size=32, seed=3)
    with pytest.raises(IngestError, match=r"cannot write dataset demo: No space left on device while writing "
                                          r".*\.demo\.partial.*; the previous version is unchanged"):
        ingest_export(source=grown.folder, labels_csv=grown.labels_csv, dataset_dir=target,
                      settings=IngestSettings(), salt=SALT)
    assert (target / "manifest.parquet").read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo"]  # no staging or old folder left
    assert len(list((target / "images").iterdir())) == first.n_cases
    assert pd.read_parquet(target / "manifest.parquet")["image"].map(lambda p: (target / p).is_file()).all()


def test_a_full_disk_on_the_first_ingest_writes_nothing(small_disk, tmp_path):
    grown = generate_export(tmp_path / "grown", n_patients=600, image_size=32, seed=3)
    with pytest.raises(IngestError, match="No space left on device .*; nothing was written"):
        ingest_export(source=grown.folder, labels_csv=grown.labels_csv, dataset_dir=small_disk / "data" / "demo",
                      settings=IngestSettings(), salt=SALT)
    assert list((small_disk / "data").iterdir()) == []
