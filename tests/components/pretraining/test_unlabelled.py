"""Images without labels: ingested as task ``unlabelled``, validated, pretrained on (no k-NN check), and refused
by training in one line."""

from __future__ import annotations

import pandas as pd
import pytest

from components.config import load_config
from components.data.ingest import IngestSettings, ingest_export
from components.data.step import DatasetVersion
from components.errors import ConfigError, IngestError
from components.pretraining.step import pretrain_dataset
from components.registry.encoder import register_encoder
from components.training.train import check_trainable
from components.validation.step import validate_dataset
from tests.conftest import SALT

UNLABELLED = ["data.task=unlabelled", "data.name=images", "data.image_size=32", "pretrain.epochs=1",
              "pretrain.batch_size=8", "train.device=cpu", "pretrain.experiment=test-unlabelled",
              "validation.min_group_size=1"]


@pytest.fixture
def images(workspace, small_export):
    """The small export's images with a labels CSV of paths and demographics only, ingested as unlabelled."""
    labels = pd.read_csv(small_export.labels_csv).drop(columns="label")
    csv = workspace / "images.csv"
    labels.to_csv(csv, index=False)
    report, _ = ingest_export(source=small_export.folder, labels_csv=csv, dataset_dir=workspace / "data" / "images",
                              settings=IngestSettings(task="unlabelled", val=0.2, test=0.25), salt=SALT)
    return report


def test_images_without_labels_ingest_validate_and_pretrain(images):
    manifest = pd.read_parquet(images.manifest)
    assert (manifest["label"] == "").all() and set(manifest["split"]) == {"train", "val", "test"}
    # every image of a patient in one split
    assert manifest.groupby("patient_id")["split"].nunique().max() == 1
    config = load_config(overrides=UNLABELLED, environ={})
    dataset = DatasetVersion(name="images", manifest=images.manifest, version="u1", n_cases=len(manifest),
                             n_patients=manifest["patient_id"].nunique())
    report = validate_dataset(dataset, config)
    pretrained = pretrain_dataset(dataset, report, config)
    assert pretrained.knn_auc is None and pretrained.epochs == 1
    registered = register_encoder(pretrained, dataset, config)
    assert registered.name == "images-encoder"


def test_a_labelled_task_still_needs_its_label_column(workspace, small_export):
    labels = pd.read_csv(small_export.labels_csv).drop(columns="label")
    csv = workspace / "images.csv"
    labels.to_csv(csv, index=False)
    with pytest.raises(IngestError, match=r"images.csv: missing column\(s\) label; expected path,label"):
        ingest_export(source=small_export.folder, labels_csv=csv, dataset_dir=workspace / "data" / "x",
                      settings=IngestSettings(), salt=SALT)


def test_training_on_unlabelled_images_is_refused_in_one_line():
    config = load_config(overrides=UNLABELLED, environ={})
    with pytest.raises(ConfigError) as refused:
        check_trainable(config)
    assert str(refused.value) == ("data.task is 'unlabelled': dataset 'images' has no labels to train on; pretrain "
                                  "an encoder on it (medflow pretrain), then train on a labelled dataset with "
                                  "train.backbone.source=models:/<name>@latest")
