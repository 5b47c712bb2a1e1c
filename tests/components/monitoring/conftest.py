"""A tiny registered classifier whose training data version the workspace holds, for predict and export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.config import load_config
from components.inference.evaluate import evaluate_run
from components.registry.register import register_model
from components.training.classification import train_classifier

TINY = ["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=20", "registry.experiment=test-predict",
        "registry.model_name=tiny", "evaluate.min_group_size=2", "data.name=small"]


@pytest.fixture
def registered(workspace, small_dataset) -> Path:
    """A tiny classifier registered as tiny@challenger (version 1), its data version v1 held by the workspace."""
    config = load_config(overrides=TINY, environ={})
    trained = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=config, out_dir=workspace / "eval")
    register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                   report_path=evaluation.report, config=config)
    shutil.copytree(small_dataset.parent, workspace / "data" / "small")
    (workspace / "data" / "small.dvc").write_text("outs:\n- md5: v1.dir\n  path: small\n")
    return small_dataset


