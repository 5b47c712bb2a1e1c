from __future__ import annotations

import pandas as pd
import pytest

from components.validation.expectations import validate_manifest

ATTRIBUTES = ("sex", "age_group", "race", "site")


@pytest.fixture
def manifest(small_dataset) -> pd.DataFrame:
    return pd.read_parquet(small_dataset)


def _failures(report):
    return {(f.table, f.expectation, f.column): f for f in report.failures}


def test_a_clean_manifest_passes_every_expectation(manifest):
    report = validate_manifest(manifest, num_classes=2, attributes=ATTRIBUTES, min_group_size=1)
    assert report.success, [f.describe() for f in report.failures]
    assert report.n_rows == len(manifest)
    assert report.n_expectations > 20


def test_patient_leakage_names_the_patient(manifest):
    leaked = manifest.groupby("patient_id").filter(lambda g: len(g) > 1)["patient_id"].iloc[0]
    rows = manifest.index[manifest["patient_id"] == leaked]
    manifest.loc[rows[0], "split"] = "train"
    manifest.loc[rows[1], "split"] = "test"
    failure = _failures(validate_manifest(manifest, num_classes=2))[("patients", "expect_column_values_to_be_between", "n_splits")]
    assert failure.examples == [{"n_splits": 2, "patient_id": leaked}]


def test_label_outside_the_class_set_names_the_case(manifest):
    manifest.loc[3, "label"] = 4
    failure = _failures(validate_manifest(manifest, num_classes=2))[("manifest", "expect_column_values_to_be_in_set", "label")]
    assert failure.unexpected_count == 1
    assert failure.examples == [{"label": 4, "case_id": manifest.loc[3, "case_id"]}]


def test_nulls_nan_pixels_and_duplicate_cases_are_caught(manifest):
    manifest.loc[0, "patient_id"] = None
    manifest.loc[1, "nan_count"] = 12
    manifest.loc[2, "case_id"] = manifest.loc[3, "case_id"]
    failures = _failures(validate_manifest(manifest, num_classes=2))
    assert ("manifest", "expect_column_values_to_not_be_null", "patient_id") in failures
    assert failures[("manifest", "expect_column_values_to_be_between", "nan_count")].examples[0]["nan_count"] == 12
    assert ("manifest", "expect_column_values_to_be_unique", "case_id") in failures


def test_declared_attribute_missing_and_small_groups(manifest):
    report = validate_manifest(manifest.drop(columns=["race"]), num_classes=2, attributes=ATTRIBUTES, min_group_size=1)
    assert ("manifest", "expect_column_to_exist", "race") in _failures(report)
    counts = manifest["site"].value_counts()
    report = validate_manifest(manifest, num_classes=2, attributes=["site"], min_group_size=int(counts.max()))
    failure = _failures(report)[("groups", "expect_column_values_to_be_between", "n")]
    assert sorted(e["group"] for e in failure.examples) == sorted(counts.index[counts < counts.max()])


def test_describe_is_one_readable_line(manifest):
    manifest.loc[3, "label"] = 4
    failure = validate_manifest(manifest, num_classes=2).failures[0]
    assert failure.describe() == (
        f"expect_column_values_to_be_in_set on manifest.label (1 rows): e.g. [{{'label': 4, 'case_id': '{manifest.loc[3, 'case_id']}'}}]"
    )
