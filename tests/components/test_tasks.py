from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from components.config import load_config
from components.steps import DatasetVersion
from components.tasks import step_cache_key


def _key(task: str, version: str, *overrides: str) -> str:
    dataset = DatasetVersion(name="d", manifest=Path("m"), version=version, n_cases=1, n_patients=1)
    context = SimpleNamespace(task=SimpleNamespace(name=task))
    return step_cache_key(context, {"dataset": dataset, "config": load_config(overrides=list(overrides), environ={})})


def test_cache_keys_are_explicit_values(workspace):
    assert _key("train", "v1") == _key("train", "v1")
    assert _key("train", "v1") != _key("train", "v2")  # new data
    assert _key("train", "v1") != _key("train", "v1", "train.epochs=1")  # new config
    assert _key("train", "v1") != _key("evaluate", "v1")  # another step
    assert _key("train", "v1").startswith("train-v1-")
