from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.config import load_config
from components.data.step import DatasetVersion
from components.data.versioning import read_file_at, version_dataset
from components.errors import IngestError
from components.validation.checks import DRIFT_COLUMNS
from components.validation.step import previous_manifest, validate_dataset


def test_drift_is_against_the_version_before_read_back_from_dvc_with_only_its_drift_columns(workspace, small_dataset,
                                                                                             monkeypatch):
    folder = workspace / "data" / "toy"
    folder.mkdir(parents=True)
    first = pd.read_parquet(small_dataset)
    first.to_parquet(folder / "manifest.parquet")
    before = version_dataset(workspace, folder, remote=str(workspace / "remote"))
    second = first.assign(site=np.where(np.arange(len(first)) % 3 == 0, "site-new", first["site"]))
    second.to_parquet(folder / "manifest.parquet")
    version = version_dataset(workspace, folder, remote=str(workspace / "remote"))
    dataset = DatasetVersion(name="toy", manifest=folder / "manifest.parquet", version=version.version,
                             n_cases=len(second), n_patients=second["patient_id"].nunique())

    previous = previous_manifest(dataset)
    assert list(previous.columns) == [c for c in first.columns if c in DRIFT_COLUMNS] and len(previous.columns) == 4
    pd.testing.assert_frame_equal(previous, first[list(previous.columns)])
    report = json.loads(validate_dataset(dataset, load_config(environ={})).read_text())
    (sites,) = [w for w in report["warnings"] if w["table"] == "drift_sites"]
    assert "new sites ['site-new']" in sites["note"] and report["notes"] == []
    for other in (before.version, "0" * 32):  # the first version, and one git does not know
        assert previous_manifest(DatasetVersion(name="toy", manifest=folder / "manifest.parquet", version=other,
                                                n_cases=1, n_patients=1)) is None
    # the version before damaged in the cache: one line that names it, not pyarrow's error
    monkeypatch.setattr("components.validation.step.read_file_at", lambda *a: read_file_at(*a)[:-40])
    with pytest.raises(IngestError) as info:
        previous_manifest(dataset)
    named = f"cannot read toy/manifest.parquet of data version {before.version[:12]} (commit "
    assert str(info.value).startswith(named)
