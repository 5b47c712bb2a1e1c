"""External validation's view of a data version: the named sites' patients leave train, val and test."""

from __future__ import annotations

import pandas as pd
import pytest

from components.config import StudyConfig
from components.data.ingest import load_manifest
from components.data.study import EXTERNAL, external_view, study_manifest
from components.errors import ConfigError


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
