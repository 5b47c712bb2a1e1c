"""Fuzzing with a fixed budget: any labels file, config, manifest or DICOM header ends in success or a
medflow error with a message, never an unhandled exception."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from components.config import load_config
from components.data.dicom import read_dicom_case
from components.data.ingest import IngestSettings, ingest_export, load_manifest
from components.errors import MedflowError
from components.validation.expectations import validate_manifest

from tests.conftest import SALT

# A fixed budget, the same examples on every CI run; HYPOTHESIS_PROFILE=explore draws new ones, 10x as many.
EXPLORE = os.environ.get("HYPOTHESIS_PROFILE") == "explore"
BUDGET = settings(max_examples=400 if EXPLORE else 40, derandomize=not EXPLORE, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])


def _ends_well(call) -> None:
    """Success, or a MedflowError whose message says something."""
    try:
        call()
    except MedflowError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-export")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), folder / name)
    return folder


cells = st.one_of(st.text(max_size=12), st.integers(-5, 5).map(str), st.sampled_from(["CT_small.dcm", "MR_small.dcm",
                  "nope.dcm", "", "..", "/etc/passwd", "0", "1", "nan", "F", "M"]))


@BUDGET
@given(
    header=st.lists(st.sampled_from(["path", "label", "patient_id", "sex", "age", "race", "site", "extra", ""]),
                    min_size=0, max_size=6),
    rows=st.lists(st.lists(cells, min_size=0, max_size=7), max_size=5),
    raw=st.one_of(st.none(), st.binary(max_size=200)),
)
def test_any_labels_file_ends_in_a_dataset_or_a_clear_error(export, header, rows, raw):
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        if raw is not None:
            labels.write_bytes(raw)
        else:
            labels.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
        _ends_well(lambda: ingest_export(source=export, labels_csv=labels, dataset_dir=Path(tmp) / "data" / "d",
                                         settings=IngestSettings(), salt=SALT))


KEYS = ["train.epochs", "train.lr", "train.model", "data.num_classes", "data.splits.val", "data.format", "data.task",
        "promotion.rules", "placement.train", "validation.intensity_ranges", "train.class_weights", "nope", "data",
        "train.epochs.x", "evaluate.threshold", "data.attributes", "registry"]


@BUDGET
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}")
                          | st.text(max_size=20), max_size=4),
       document=st.one_of(st.none(), st.text(max_size=120)))
def test_any_config_ends_in_a_config_or_a_clear_error(tmp_path, overrides, document):
    path = None
    if document is not None:
        path = tmp_path / "fuzz.yaml"
        path.write_text(document)
    _ends_well(lambda: load_config(path, overrides=overrides, environ={}))


manifest_columns = st.sampled_from(["case_id", "patient_id", "split", "image", "label", "sha256", "nan_count",
                                    "inf_count", "shape", "spacing", "modality", "min", "max", "mean", "site", "sex"])
values = st.one_of(st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=6),
                   st.sampled_from(["train", "val", "test", "CT", "MR", "32x32", "1x1"]))


@settings(BUDGET, max_examples=120 if EXPLORE else 12)  # each example runs every great-expectations suite (about 1 s)
@given(columns=st.lists(manifest_columns, min_size=1, max_size=10, unique=True),
       rows=st.integers(0, 8), data=st.data())
def test_any_manifest_ends_in_a_report(columns, rows, data):
    frame = pd.DataFrame({c: data.draw(st.lists(values, min_size=rows, max_size=rows)) for c in columns})
    _ends_well(lambda: validate_manifest(frame, num_classes=2, attributes=("sex", "site"), previous=frame))


@BUDGET
@given(raw=st.binary(max_size=300))
def test_any_manifest_file_ends_in_a_table_or_a_clear_error(tmp_path, raw):
    for name in ("m.parquet", "m.csv"):
        (tmp_path / name).write_bytes(raw)
        _ends_well(lambda: load_manifest(tmp_path / name))


HEADER_FIELDS = {
    "Rows": st.integers(-1, 300), "Columns": st.integers(-1, 300), "BitsAllocated": st.sampled_from([1, 7, 8, 16, 32, 64]),
    "SamplesPerPixel": st.integers(0, 4), "NumberOfFrames": st.integers(-1, 5),
    "PixelSpacing": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    "ImageOrientationPatient": st.lists(st.floats(-2, 2), max_size=7),
    "ImagePositionPatient": st.lists(st.floats(allow_nan=True), max_size=4),
    "RescaleSlope": st.floats(allow_nan=True, allow_infinity=True), "RescaleIntercept": st.floats(-1e6, 1e6),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "bogus"]),
}


@BUDGET
@given(changes=st.dictionaries(st.sampled_from(sorted(HEADER_FIELDS)), st.none(), max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: HEADER_FIELDS[k] for k in keys})), flips=st.lists(st.integers(0, 2000), max_size=6))
def test_any_dicom_header_ends_in_a_case_or_a_clear_error(tmp_path, changes, flips):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in changes.items():
        try:
            setattr(ds, keyword, value)
        except (ValueError, TypeError, OverflowError):
            continue
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=False)
    except Exception:  # noqa: BLE001 (pydicom refuses to write some of these headers; nothing to read then)
        return
    data = bytearray(buffer.getvalue())
    for position in flips:  # corrupt header bytes too
        if position < len(data):
            data[position] ^= 0xFF
    path = tmp_path / "fuzzed.dcm"
    path.write_bytes(bytes(data))
    def read():
        case = read_dicom_case(path)
        assert case.array.dtype == np.float32 and case.affine.shape == (4, 4)
    _ends_well(read)
