"""A dataset image cut short, corrupt or gone after ingest: training, pretraining's loader and evaluation's
prediction end in one line naming the file (UnreadableImage), wherever the image is read: the intensity
statistics, MONAI's cache, a DataLoader worker process or the predicting pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from monai.data import Dataset

from components import paths
from components.config import load_config
from components.errors import UnreadableImage
from components.pretraining.pretrain import pretrain_encoder
from components.training.classification import train_classifier
from components.training.datasets import train_loader
from components.training.forward import predict_batches
from components.training.preprocess import (
    PreprocessSpec, SegmentationSpec, segmentation_transforms, training_transforms, unreadable_images_named,
)

TINY = ["train.epochs=1", "train.batch_size=16", "data.image_size=32", "registry.experiment=test-unreadable"]
SPEC = PreprocessSpec(spatial_size=(32, 32), mean=0.0, std=1.0)


def _copy(manifest_path: Path, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """The dataset copied, so that damaging one of its files leaves the session's dataset whole."""
    folder = shutil.copytree(manifest_path.parent, tmp_path / "dataset")
    return folder / manifest_path.name, pd.read_parquet(manifest_path)


def _cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header reads; gzip runs out inside the voxels


def _one_line(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "medflow data checkout" in message  # what to do
    return message


def test_training_names_a_training_image_cut_short(workspace, small_dataset, tmp_path):
    manifest_path, manifest = _copy(small_dataset, tmp_path)
    image = manifest_path.parent / manifest.loc[manifest.split == "train", "image"].iloc[3]
    _cut_short(image)
    config = load_config(overrides=TINY, environ={})
    with pytest.raises(UnreadableImage) as error:
        train_classifier(manifest_path=manifest_path, data_version="v", config=config)
    assert "Compressed file ended" in _one_line(error, image)  # gzip's own word, read by the intensity statistics


def test_training_names_a_corrupt_validation_image_and_starts_no_run(workspace, small_dataset, tmp_path):
    manifest_path, manifest = _copy(small_dataset, tmp_path)
    image = manifest_path.parent / manifest.loc[manifest.split == "val", "image"].iloc[0]
    image.write_bytes(b"not a NIfTI file at all")  # MONAI: "cannot find a suitable reader", the reason in its text
    config = load_config(overrides=[*TINY, "train.cache=memory"], environ={})
    with pytest.raises(UnreadableImage) as error:
        train_classifier(manifest_path=manifest_path, data_version="v", config=config)
    assert "ImageFileError" in _one_line(error, image)  # nibabel's reason, out of MONAI's help text
    client = mlflow.MlflowClient(paths.tracking_uri())
    experiment = client.get_experiment_by_name("test-unreadable")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # refused before the run


def test_an_image_met_by_a_worker_mid_epoch_ends_the_run_failed_with_one_line(workspace, small_dataset, tmp_path,
                                                                              monkeypatch):
    from components.training import classification  # noqa: PLC0415

    monkeypatch.setattr(classification, "intensity_stats", lambda paths: (0.0, 1.0))  # the loader meets it first
    manifest_path, manifest = _copy(small_dataset, tmp_path)
    image = manifest_path.parent / manifest.loc[manifest.split == "train", "image"].iloc[0]
    _cut_short(image)
    config = load_config(overrides=[*TINY, "train.cache=none", "train.num_workers=2"], environ={})
    with pytest.raises(UnreadableImage) as error:
        train_classifier(manifest_path=manifest_path, data_version="v", config=config)
    assert "Compressed file ended" in _one_line(error, image)
    client = mlflow.MlflowClient(paths.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("test-unreadable").experiment_id])
    assert run.info.status == "FAILED"


def test_pretraining_names_a_validation_image_cut_short(workspace, small_dataset, tmp_path):
    manifest_path, manifest = _copy(small_dataset, tmp_path)
    image = manifest_path.parent / manifest.loc[manifest.split == "val", "image"].iloc[1]
    _cut_short(image)
    config = load_config(overrides=["pretrain.epochs=1", "pretrain.batch_size=8", "data.image_size=32",
                                    "train.cache=memory", "pretrain.experiment=test-unreadable"], environ={})
    with pytest.raises(UnreadableImage) as error:  # the views' load transform, in MONAI's cache
        pretrain_encoder(manifest_path=manifest_path, data_version="v", config=config)
    assert "Compressed file ended" in _one_line(error, image)


def test_a_dataloader_worker_process_names_the_image_it_cannot_read(small_dataset, tmp_path):
    manifest_path, manifest = _copy(small_dataset, tmp_path)
    images = [manifest_path.parent / p for p in manifest["image"].head(8)]
    _cut_short(images[5])
    cfg = load_config(overrides=["train.num_workers=2", "train.batch_size=4"], environ={}).train
    loader = train_loader(Dataset([{"image": str(p)} for p in images], training_transforms(SPEC, augment=False)),
                          cfg, sampler=None, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert loader.num_workers == 2
    with pytest.raises(UnreadableImage) as error, unreadable_images_named():
        for _ in loader:
            pass
    assert "Compressed file ended" in _one_line(error, images[5])


def test_evaluation_names_a_test_image_that_is_gone(small_dataset, tmp_path):
    manifest_path, manifest = _copy(small_dataset, tmp_path)
    images = [manifest_path.parent / p for p in manifest.loc[manifest.split == "test", "image"]]
    images[2].unlink()
    loader = torch.utils.data.DataLoader(
        Dataset([{"image": str(p)} for p in images], training_transforms(SPEC, augment=False)), batch_size=4)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 2))
    with pytest.raises(UnreadableImage) as error:
        predict_batches(network, loader, torch.device("cpu"))
    assert "No such file" in _one_line(error, images[2])


def test_segmentation_names_the_mask_and_not_its_image(seg_dataset, tmp_path):
    manifest_path, manifest = _copy(seg_dataset, tmp_path)
    case = manifest.iloc[0]
    mask = manifest_path.parent / case["label"]
    _cut_short(mask)
    transform = segmentation_transforms(SegmentationSpec(patch_size=(16, 16, 8), mean=0.0, std=1.0), augment=False)
    with pytest.raises(UnreadableImage) as error, unreadable_images_named():
        Dataset([{"image": str(manifest_path.parent / case["image"]), "label": str(mask)}], transform)[0]
    message = _one_line(error, mask)
    assert str(manifest_path.parent / case["image"]) not in message


def test_other_errors_pass_through_untouched():
    with pytest.raises(ValueError, match="^something else$"), unreadable_images_named():
        raise ValueError("something else")
