"""Study views of a data version: external sites' patients leave train, val and test; label fractions keep a
nested, stratified share of the training patients."""

from __future__ import annotations

import hashlib
import math

import pandas as pd
import pytest

from components.config import StudyConfig, load_config
from components.data.ingest import load_manifest
from components.data.study import (
    EXTERNAL, UNUSED, external_view, fold_arms, fold_of, fold_view, fraction_arms, fraction_view, nested_arms, site_arms,
    study_manifest, training_patients,
)
from components.errors import ConfigError
from components.steps import get_step


def test_the_external_sites_cases_and_only_theirs_leave_the_internal_splits(small_dataset, workspace):
    manifest = load_manifest(small_dataset)
    path = study_manifest(small_dataset, StudyConfig(external_sites=("site-c",)))
    view = pd.read_parquet(path)
    assert path != small_dataset and path.is_relative_to(workspace / ".medflow" / "studies")
    assert (view["case_id"] == manifest["case_id"]).all()
    from_c = manifest["site"] == "site-c"
    assert (view.loc[from_c, "split"] == EXTERNAL).all() and from_c.any()
    assert (view.loc[~from_c, "split"] == manifest.loc[~from_c, "split"]).all()
    assert all(pd.io.common.file_exists(p) for p in view["image"])  # absolute: read from anywhere
    assert study_manifest(small_dataset, StudyConfig(external_sites=("site-c",))) == path  # same study, same file
    assert study_manifest(small_dataset, StudyConfig()) == small_dataset


def test_bad_external_sites_are_one_line(small_dataset):
    manifest = load_manifest(small_dataset)
    with pytest.raises(ConfigError, match=r"no case of m is from site 'site-x'; sites are site-a, site-b, site-c; "
                                          r"did you mean 'site-c'\?"):
        external_view(manifest, ("site-x",), where="m")
    with pytest.raises(ConfigError, match=r"leave no train or val or test case in m: the remaining sites are none"):
        external_view(manifest, ("site-a", "site-b", "site-c"), where="m")
    with pytest.raises(ConfigError, match="needs a 'site' column in m"):
        external_view(manifest.drop(columns="site"), ("site-a",), where="m")


def test_label_fractions_are_nested_stratified_and_leave_val_and_test_alone(small_dataset):
    manifest = load_manifest(small_dataset)
    train = manifest[manifest["split"] == "train"]
    labels = train.sort_values("case_id").groupby("patient_id")["label"].first().astype(str)
    kept = {}
    for fraction in (0.1, 0.3, 0.6, 1.0):
        view = fraction_view(manifest, fraction)
        assert (view["case_id"] == manifest["case_id"]).all()
        untouched = manifest["split"] != "train"
        assert (view.loc[untouched, "split"] == manifest.loc[untouched, "split"]).all()
        assert set(view.loc[~untouched, "split"]) <= {"train", UNUSED}
        kept[fraction] = set(view.loc[view["split"] == "train", "patient_id"])
        # per label, ceil(fraction x the label's training patients), a patient's cases together
        for label, patients in labels.groupby(labels):
            assert len(kept[fraction] & set(patients.index)) == math.ceil(fraction * len(patients))
        assert not set(view.loc[view["split"] == UNUSED, "patient_id"]) & kept[fraction]
        pd.testing.assert_frame_equal(fraction_view(manifest, fraction), view)  # the same every time
    assert kept[0.1] < kept[0.3] < kept[0.6] < kept[1.0] == set(train["patient_id"])


def test_a_label_fraction_keeps_one_patient_of_each_label_and_orders_patients_by_their_hash(small_dataset):
    manifest = load_manifest(small_dataset)
    tiny = fraction_view(manifest, 0.001)
    assert set(tiny.loc[tiny["split"] == "train", "label"].astype(str)) == set(
        manifest.loc[manifest["split"] == "train", "label"].astype(str))
    # growing the dataset by new patients does not reorder the old ones: a kept patient outranks the dropped
    view = fraction_view(manifest, 0.5, stratify=False)
    rank = lambda p: hashlib.sha256(f"label-fraction:{p}".encode()).hexdigest()  # noqa: E731
    kept = view.loc[view["split"] == "train", "patient_id"].map(rank)
    dropped = view.loc[view["split"] == UNUSED, "patient_id"].map(rank)
    assert kept.max() < dropped.min()


def test_each_arm_is_an_ordinary_run_on_its_fraction(small_dataset, workspace):
    config = load_config(overrides=["study.label_fractions=[1.0, 0.2]", "study.parallel=2"], environ={})
    arms = fraction_arms(config)
    assert [f for f, _ in arms] == [0.2, 1.0]
    plain = load_config(environ={})
    assert arms[1][1].study == plain.study  # the 1.0 arm is the plain run: the same step keys, reused
    inputs = {"dataset": "v1", "validation_report": "report.json"}
    key = get_step("train").key
    assert key(arms[1][1], inputs) == key(plain, inputs) != key(arms[0][1], inputs)
    path = study_manifest(small_dataset, arms[0][1].study)
    view = fraction_view(load_manifest(small_dataset), 0.2)
    assert training_patients(path) == view.loc[view["split"] == "train", "patient_id"].nunique()
    assert training_patients(path) < training_patients(small_dataset)


@pytest.mark.parametrize(("overrides", "message"), [
    (["study.label_fractions=[0, 1]"], r"label_fractions must each be in \(0, 1\], got 0"),
    (["study.label_fractions=[0.1, 1.5]"], r"label_fractions must each be in \(0, 1\], got 1.5"),
    (["study.label_fractions=[0.1, 0.1]"], "lists a fraction twice"),
    (["study.label_fractions=[0.1]", "study.train_fraction=0.5"], "not both"),
    (["study.train_fraction=0"], "greater than 0"),
])
def test_bad_label_fractions_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


def test_leaving_one_site_out_holds_out_each_site_beside_the_plain_run(small_dataset):
    config = load_config(overrides=["study.leave_one_site_out=true"], environ={})
    arms = site_arms(config, small_dataset)
    assert [site for site, _ in arms] == [None, "site-a", "site-b", "site-c"]
    assert arms[0][1].study == load_config(environ={}).study  # the run on every site is the plain run
    assert [arm.study.external_sites for _, arm in arms[1:]] == [("site-a",), ("site-b",), ("site-c",)]
    assert not any(arm.study.leave_one_site_out for _, arm in arms)


def test_leaving_one_site_out_needs_two_sites_and_stands_alone(small_dataset, workspace):
    config = load_config(overrides=["study.leave_one_site_out=true"], environ={})
    manifest = load_manifest(small_dataset)
    one_site = workspace / "one-site.parquet"
    manifest.assign(site="site-a").to_parquet(one_site)
    with pytest.raises(ConfigError, match=r"needs at least two sites; .*one-site.parquet has site-a"):
        site_arms(config, one_site)
    manifest.drop(columns="site").to_parquet(one_site)
    with pytest.raises(ConfigError, match="needs a 'site' column"):
        site_arms(config, one_site)
    for extra in ("study.label_fractions=[0.5]", "study.external_sites=[site-a]", "study.train_fraction=0.5",
                  "data.task=segmentation"):
        with pytest.raises(ConfigError, match="leave_one_site_out"):
            load_config(overrides=["study.leave_one_site_out=true", extra], environ={})


def test_folds_deal_every_train_and_val_patient_once_per_label_and_leave_test_alone(small_dataset):
    manifest = load_manifest(small_dataset)
    pool = manifest["split"].isin(("train", "val"))
    assigned = fold_of(manifest, 3)
    assert set(assigned.index) == set(manifest.loc[pool, "patient_id"]) and set(assigned) == {0, 1, 2}
    labels = manifest[pool].sort_values("case_id").groupby("patient_id")["label"].first()
    for _, patients in labels.groupby(labels):  # each label dealt evenly: fold sizes differ by at most one
        sizes = assigned[patients.index].value_counts()
        assert sizes.max() - sizes.min() <= 1
    seen = []
    for fold in range(3):
        view = fold_view(manifest, 3, fold)
        assert (view.loc[~pool, "split"] == manifest.loc[~pool, "split"]).all()  # test untouched
        val = view[view["split"] == "val"]
        assert set(val["patient_id"].map(assigned)) == {fold}
        assert not set(val["patient_id"]) & set(view.loc[view["split"] == "train", "patient_id"])
        seen += list(val["case_id"])
    assert sorted(seen) == sorted(manifest.loc[pool, "case_id"])  # every train or val case validated on once
    pd.testing.assert_series_equal(fold_of(manifest, 3), assigned)


def test_each_fold_is_an_arm_beside_the_plain_run(small_dataset, workspace):
    config = load_config(overrides=["study.folds=3", "study.external_sites=[site-c]"], environ={})
    arms = fold_arms(config, small_dataset)
    assert [k for k, _ in arms] == [None, 0, 1, 2]
    assert arms[0][1].study == StudyConfig(external_sites=("site-c",))
    assert [(a.study.folds, a.study.fold, a.study.external_sites) for _, a in arms[1:]] == [
        (3, k, ("site-c",)) for k in range(3)]
    view = pd.read_parquet(study_manifest(small_dataset, arms[1][1].study))
    assert (view.loc[view["site"] == "site-c", "split"] == EXTERNAL).all()  # external sites stay out of every fold
    manifest = load_manifest(small_dataset)
    pool = manifest[manifest["split"].isin(("train", "val"))]
    fewest = int(pool.sort_values("case_id").groupby("patient_id")["label"].first().astype(str).value_counts().min())
    with pytest.raises(ConfigError, match=rf"study.folds {fewest + 1} is more than the {fewest} train and val patient"):
        fold_arms(load_config(overrides=[f"study.folds={fewest + 1}"], environ={}), small_dataset)
    for overrides, message in ((["study.folds=1"], "at least 2"), (["study.folds=3", "study.fold=3"], "not one of"),
                               (["study.folds=3", "study.leave_one_site_out=true"], "a study of its own")):
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=overrides, environ={})


def test_nested_arms_cross_validate_each_candidate_inside_each_outer_fold_which_they_never_see(small_dataset, workspace):
    config = load_config(overrides=["study.folds=3", "study.candidates=[{train.lr: 0.01}, {train.lr: 0.0001}]"],
                         environ={})
    arms = dict(nested_arms(config, small_dataset))
    assert len(arms) == 2 * (1 + 3 + 3 * 2)  # per candidate: its plain run, its 3 folds, 3 x 2 inner arms
    assert [arms["plain", c].train.lr for c in (0, 1)] == [0.01, 0.0001]
    assert all(not a.study.candidates for a in arms.values())  # each arm an ordinary run
    manifest = load_manifest(small_dataset)
    pool = manifest["split"].isin(("train", "val"))
    assigned = manifest["patient_id"].map(fold_of(manifest, 3))
    for (kind, c, *folds), arm in arms.items():
        assert arm.train.lr == (0.01, 0.0001)[c]
        if kind != "inner":
            continue
        outer, inner = folds
        view = pd.read_parquet(study_manifest(small_dataset, arm.study))
        assert (view.loc[~pool, "split"] == manifest.loc[~pool, "split"]).all()  # test untouched
        assert (view.loc[pool & (assigned == outer), "split"] == UNUSED).all()  # the outer fold: never seen
        assert (view.loc[pool & (assigned == inner), "split"] == "val").all()
        assert set(assigned[pool & (view["split"] == "train")]) == {0, 1, 2} - {outer, inner}
    # the outer arms are fold_arms' own: the same manifests, so a fold arm of a plain k-fold study is reused
    plain = dict(fold_arms(config.model_copy(update={"study": StudyConfig(folds=3)}), small_dataset))
    assert study_manifest(small_dataset, arms["fold", 0, 1].study) == study_manifest(small_dataset, plain[1].study)


@pytest.mark.parametrize(("overrides", "message"), [
    (["study.folds=2", "study.candidates=[{train.lr: 0.1}, {train.lr: 0.2}]"], "need folds of at least 3"),
    (["study.folds=3", "study.candidates=[{train.lr: 0.1}]"], "lists one config"),
    (["study.folds=3", "study.candidates=[{train.lr: 0.1}, {train.lr: 0.2}]", "data.task=segmentation"],
     "is for classifiers"),
])
def test_bad_nested_studies_are_refused_by_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


@pytest.mark.parametrize(("candidate", "message"), [
    ("{train.lrr: 0.1}", r"study.candidates\[1\]: unknown config key 'train.lrr'; did you mean 'train.lr'\?"),
    ("{data.image_size: 32}", r"study.candidates\[1\]: data.image_size is not a setting a candidate may change"),
    ("{train.epochs: -1}", r"study.candidates\[1\]: train.epochs: "),
])
def test_a_bad_candidate_is_named_before_any_arm(small_dataset, workspace, candidate, message):
    config = load_config(overrides=["study.folds=3", f"study.candidates=[{{train.lr: 0.1}}, {candidate}]"], environ={})
    with pytest.raises(ConfigError, match=message):
        nested_arms(config, small_dataset)
