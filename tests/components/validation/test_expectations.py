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


def test_non_finite_voxels_and_implausible_intensities_name_the_case(manifest):
    manifest["modality"] = "CT"
    manifest.loc[4, "inf_count"] = 3
    manifest.loc[5, "min"] = -9000.0  # below any CT value after the modality LUT
    failures = _failures(validate_manifest(manifest, num_classes=2))
    assert failures[("manifest", "expect_column_values_to_be_between", "inf_count")].examples == [
        {"inf_count": 3, "case_id": manifest.loc[4, "case_id"]}
    ]
    assert failures[("manifest", "expect_column_values_to_be_between", "min")].examples == [
        {"min": -9000.0, "case_id": manifest.loc[5, "case_id"]}
    ]
    mr = manifest.assign(modality="MR", min=manifest["min"].clip(lower=-100))  # MR's floor is 0, not CT's
    assert ("manifest", "expect_column_values_to_be_between", "min") in _failures(validate_manifest(mr, num_classes=2))
    cr = manifest.assign(modality="CR")  # no range declared for CR
    assert ("manifest", "expect_column_values_to_be_between", "min") not in _failures(validate_manifest(cr, num_classes=2))
    mr_ok = mr.assign(min=0.0)
    assert ("manifest", "expect_column_values_to_be_between", "min") not in _failures(validate_manifest(mr_ok, num_classes=2))


def test_the_same_image_in_two_splits_is_named(manifest):
    train, test = manifest.index[manifest["split"] == "train"][0], manifest.index[manifest["split"] == "test"][0]
    manifest.loc[test, "sha256"] = manifest.loc[train, "sha256"]
    failure = _failures(validate_manifest(manifest, num_classes=2))[("duplicates", "expect_column_values_to_be_between", "n_splits")]
    assert failure.examples == [{"n_splits": 2, "cases": ",".join(sorted(manifest.loc[[train, test], "case_id"]))}]


def test_mixed_geometry_fails_only_when_the_config_asks_for_one(manifest):
    manifest.loc[0, "spacing"] = "0.7x0.7"
    assert validate_manifest(manifest, num_classes=2).success
    failures = _failures(validate_manifest(manifest, num_classes=2, consistent_geometry=True))
    assert failures[("manifest", "expect_column_unique_value_count_to_be_between", "spacing")].examples == [{"observed": 2}]
    manifest.loc[1, "shape"] = "32x32x4"  # a volume among slices is never right
    assert ("manifest", "expect_column_unique_value_count_to_be_between", "ndim") in _failures(validate_manifest(manifest, num_classes=2))


def test_segmentation_masks_must_share_their_images_geometry(manifest):
    seg = manifest.assign(label=[f"labels/{c}.nii.gz" for c in manifest["case_id"]], mask_shape=manifest["shape"],
                          mask_spacing=manifest["spacing"])
    assert validate_manifest(seg, num_classes=2, task="segmentation").success
    seg.loc[2, "mask_shape"] = "16x16"
    failure = _failures(validate_manifest(seg, num_classes=2, task="segmentation"))[
        ("manifest", "expect_column_pair_values_to_be_equal", None)]
    assert failure.unexpected_count == 1


def test_drift_is_a_warning_with_the_shift_and_the_sites(manifest):
    previous = manifest.copy()
    current = manifest.copy()
    current.loc[current["label"] == 0, "label"] = 1  # every case positive now
    current.loc[0, "site"] = "site-new"
    report = validate_manifest(current, num_classes=2, previous=previous)
    assert report.success  # drift does not block
    warnings = {(w.table, w.column): w for w in report.warnings}
    before = previous["label"].value_counts(normalize=True)
    shifts = {e["label"]: e["shift"] for e in warnings[("drift_labels", "shift")].examples}
    assert shifts == pytest.approx({0: before[0], 1: before[0]})
    assert "new sites ['site-new']" in warnings[("drift_sites", "site")].describe()
    assert validate_manifest(manifest, num_classes=2, previous=previous).warnings == ()


def test_intensity_drift_in_units_of_the_previous_spread(manifest):
    shifted = manifest.assign(mean=manifest["mean"] + manifest["mean"].std())
    report = validate_manifest(shifted, num_classes=2, previous=manifest, drift_intensity_sd=0.5)
    (warning,) = [w for w in report.warnings if w.table == "drift_intensity"]
    assert warning.examples[0]["shift"] == pytest.approx(1.0)


def test_data_docs_site_lists_every_suite(manifest, tmp_path):
    report = validate_manifest(manifest, num_classes=2, attributes=ATTRIBUTES, previous=manifest, docs_dir=tmp_path / "docs")
    assert report.data_docs == tmp_path / "docs" / "index.html"
    index = report.data_docs.read_text()
    for suite in ("manifest", "patients", "duplicates", "groups", "drift_labels"):
        assert suite in index
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_numeric_columns_must_hold_numbers(manifest):
    assert validate_manifest(manifest, num_classes=2).success
    manifest["age"] = manifest["age"].astype(str)
    failure = _failures(validate_manifest(manifest, num_classes=2))[("manifest", "expect_column_values_to_be_in_type_list", "age")]
    assert failure.examples == [{"observed": "str"}]
