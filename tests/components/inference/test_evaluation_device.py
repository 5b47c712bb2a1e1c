"""Where an evaluation predicts (on ``train.device``, its images prepared by ``train.num_workers`` processes) and
what it reads of the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.config import load_config
from components.errors import ConfigError
from components.inference import classification
from components.inference.evaluate import evaluate_run
from components.machine import usable_cores
from components.training import forward
from components.training.classification import train_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset):
    """One epoch of the demo's DenseNet at 32x32, in a workspace of its own."""
    folder = tmp_path_factory.mktemp("evaluation-device")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MEDFLOW_HOME", raising=False)
        config = load_config(overrides=["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=20",
                                        "evaluate.min_group_size=3", "registry.experiment=test-eval-device"],
                             environ={})
        run = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
        yield folder, run.run_id


def _evaluate(trained, manifest, monkeypatch, *overrides: str):
    folder, run_id = trained
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config(overrides=["data.image_size=32", "evaluate.n_bootstrap=20", "evaluate.min_group_size=3",
                                    "registry.experiment=test-eval-device", *overrides], environ={})
    out = folder / f"eval-{len(list(folder.glob('eval-*')))}"
    evaluation = evaluate_run(run_id=run_id, manifest_path=manifest, config=config, out_dir=out)
    return pd.read_parquet(evaluation.predictions), json.loads(evaluation.report.read_text())


@pytest.mark.skipif(usable_cores() < 2, reason="two DataLoader workers need two cores")
def test_workers_prepare_the_images_and_change_no_prediction(trained, small_dataset, monkeypatch):
    """The val, test and train (shortcut audit) images go through two worker processes; the predictions, the
    temperature and the shortcut audit are those of an evaluation without workers."""
    made = []
    loader = forward.DataLoader

    def recording(*args, **kwargs):
        made.append(kwargs.get("num_workers", 0))
        return loader(*args, **kwargs)

    plain, plain_report = _evaluate(trained, small_dataset, monkeypatch)
    monkeypatch.setattr(forward, "DataLoader", recording)
    fed, fed_report = _evaluate(trained, small_dataset, monkeypatch, "train.num_workers=2")
    assert made == [2, 2, 2]  # val, test, the train split's features
    pd.testing.assert_frame_equal(fed, plain)
    assert fed_report["calibration"]["temperature"] == plain_report["calibration"]["temperature"]
    assert fed_report["shortcuts"] == plain_report["shortcuts"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine lacks")
def test_an_evaluation_asked_for_a_gpu_it_lacks_says_so_before_predicting(trained, small_dataset, monkeypatch):
    """``train.device`` decides where the evaluation predicts, as it does where training runs."""
    with pytest.raises(ConfigError, match="train.device is 'cuda' but no CUDA device is available"):
        _evaluate(trained, small_dataset, monkeypatch, "train.device=cuda")


def test_more_workers_than_cores_are_refused_before_predicting(trained, small_dataset, monkeypatch):
    with pytest.raises(ConfigError, match=f"train.num_workers={usable_cores() + 1}, but this machine"):
        _evaluate(trained, small_dataset, monkeypatch, f"train.num_workers={usable_cores() + 1}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_an_evaluation_predicts_on_the_gpu_training_takes(trained, small_dataset, monkeypatch):
    """On a GPU machine: the network is on CUDA and its predictions are a CPU evaluation's to float rounding."""
    seen = []
    on_cpu, _ = _evaluate(trained, small_dataset, monkeypatch, "train.device=cpu")
    original = forward.network_input

    def spying(images, device, **kwargs):
        seen.append(device.type)
        return original(images, device, **kwargs)

    monkeypatch.setattr(forward, "network_input", spying)
    on_gpu, _ = _evaluate(trained, small_dataset, monkeypatch, "train.device=auto")
    assert seen and set(seen) == {"cuda"}
    assert on_gpu["prob"].to_numpy() == pytest.approx(on_cpu["prob"].to_numpy(), abs=1e-4)


def test_the_evaluation_reads_the_columns_it_uses_and_every_attribute_configured(trained, small_dataset, monkeypatch,
                                                                                 tmp_path):
    """The manifest's image facts and hashes stay unread (and out of the tables the report joins); an attribute
    that is no default one (a scanner column) is still broken down and probed, and the external cases' sites are
    still named where ``site`` is not among the attributes."""
    manifest = pd.read_parquet(small_dataset)
    patients = manifest["patient_id"].astype("category").cat.codes.to_numpy()
    manifest["scanner"] = np.where(patients % 2, "vendor-a", "vendor-b")
    manifest.loc[manifest["site"].eq("site-c") & manifest["split"].eq("test"), "split"] = "external"
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    for entry in {Path(p).parts[0] for p in manifest["image"]}:
        (tmp_path / entry).symlink_to(small_dataset.parent / entry)
    read = []
    load = classification.load_manifest

    def recording(path, columns=None):
        read.append(frame := load(path, columns=columns))
        return frame

    monkeypatch.setattr(classification, "load_manifest", recording)
    _, report = _evaluate(trained, tmp_path / "manifest.parquet", monkeypatch, "data.attributes=[sex, scanner]")
    assert set(read[0].columns) == {"case_id", "patient_id", "split", "image", "label", "site", "sex", "scanner"}
    test = manifest[manifest["split"] == "test"]
    assert {g: m["n"] for g, m in report["groups"]["scanner"].items()} == test["scanner"].value_counts().to_dict()
    assert set(report["shortcuts"]) == {"sex", "scanner"}
    assert report["external"]["sites"] == ["site-c"]
    assert report["external"]["n"] == (manifest["split"] == "external").sum()
