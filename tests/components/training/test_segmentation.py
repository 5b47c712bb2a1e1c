"""Segmentation training: 2D and 3D, every network, the losses, caching, and configs that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torchmetrics.functional.classification import binary_calibration_error

from components import paths
from components.config import load_config
from components.data.ingest import load_manifest
from components.errors import ConfigError
from components.inference.evaluate import evaluate_run
from components.inference.model import load_checkpoint
from components.inference.predict import segment_arrays, segment_tensor
from components.training.loop import CHECKPOINT_DIR
from components.training.models import SEGMENTERS, build_segmenter, segmenter_kwargs
from components.training.losses import build_seg_loss
from components.training.segmentation import default_patch, train_segmenter
from components.training.train import check_trainable

SEG = ["data.task=segmentation", "train.model=unet", "train.model_kwargs={}", "train.loss=dice_ce", "train.epochs=2", "train.batch_size=4",
       "train.samples_per_volume=2", "registry.experiment=test-seg", "evaluate.n_bootstrap=0"]


def _dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Foreground Dice of two binary masks, written out: 2|A and B| / (|A| + |B|)."""
    a, b = pred > 0, truth > 0
    return None if not b.any() else 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize(("dataset", "patch"), [("seg_dataset", [16, 16, 8]), ("seg2d_dataset", [32, 32])])
def test_training_logs_val_dice_that_an_independent_dice_of_the_checkpoint_reproduces(workspace, request, dataset, patch,
                                                                                     recorded_trims):
    from components.training import heap, segmentation

    trims = recorded_trims(segmentation)  # the validation offers the heap back after each case, past the limit
    manifest_path = request.getfixturevalue(dataset)
    config = load_config(overrides=[*SEG, f"train.patch_size={patch}"], environ={})
    result = train_segmenter(manifest_path=manifest_path, data_version="v1", config=config)
    assert result.metric == "val_dice" and result.run_id
    client = mlflow.MlflowClient(paths.tracking_uri())
    history = client.get_metric_history(result.run_id, "val_dice")
    assert [m.step for m in history] == [1, 2]
    # a dense output: train.memory_format auto keeps even the 2D UNet contiguous (channels_last was no faster)
    assert client.get_run(result.run_id).data.params["memory_format"] == "contiguous_format"
    folder = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=CHECKPOINT_DIR,
                                                      tracking_uri=paths.tracking_uri()))
    model, spec, description = load_checkpoint(folder)
    assert description["task"] == "segmentation" and description["spatial_dims"] == len(patch)
    assert all(p.is_contiguous() for p in model.parameters())  # and so it predicts
    assert list(spec.patch_size) == patch
    manifest = load_manifest(manifest_path)
    val = manifest[manifest["split"] == "val"]
    # one trimmer per validation (two epochs), called after each case
    assert trims == [(epoch, heap.VALIDATION_FREE_HEAP) for epoch in (0, 1) for _ in range(len(val))]
    root = manifest_path.parent
    dices = []
    for image, label in zip(val["image"], val["label"]):
        prob = segment_arrays(model, spec, nib.load(root / image).get_fdata(dtype=np.float32))
        dices.append(_dice(prob[0].argmax(axis=0), np.asarray(nib.load(root / label).dataobj)))
    expected = np.mean([d for d in dices if d is not None])
    assert result.best_metric == pytest.approx(expected, abs=1e-5)
    assert history[result.best_epoch - 1].value == pytest.approx(expected, abs=1e-5)


def test_the_evaluation_writes_the_logits_argmax_and_their_calibrated_softmax_and_scores_them_before_scaling(
        workspace, seg_dataset, monkeypatch):
    from components.inference import segmentation as evaluation_step

    config = load_config(overrides=[*SEG, "train.epochs=1", "train.patch_size=[16, 16, 8]"], environ={})
    trained = train_segmenter(manifest_path=seg_dataset, data_version="v1", config=config)
    out = workspace / "evaluation"
    read, load = [], evaluation_step.load_manifest
    monkeypatch.setattr(evaluation_step, "load_manifest",
                        lambda path, columns=None: read.append(load(path, columns=columns)) or read[-1])
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=seg_dataset, config=config, out_dir=out)
    # the manifest's columns it uses are read (its image facts and hashes are not), and every attribute is reported
    whole = load_manifest(seg_dataset)
    assert {"sha256", "shape"} <= set(whole.columns)
    assert set(read[0].columns) == {"case_id", "patient_id", "split", "image", "label", "site",
                                    *config.data.attributes} & set(whole.columns)
    report = json.loads((out / "report.json").read_text())
    assert set(report["groups"]) == {a for a in config.data.attributes if a in whole.columns} != set()
    folder = Path(mlflow.artifacts.download_artifacts(run_id=trained.run_id, artifact_path=CHECKPOINT_DIR,
                                                      tracking_uri=paths.tracking_uri()))
    model, spec, _ = load_checkpoint(folder)
    manifest, root = load_manifest(seg_dataset).set_index("case_id"), seg_dataset.parent
    predictions = pd.read_parquet(evaluation.predictions)
    assert sorted(predictions["case_id"]) == sorted(manifest.index[manifest["split"] == "test"])
    before, truths = [], []
    for case, mask, prob_map in predictions[["case_id", "mask", "prob_map"]].itertuples(index=False):
        image = nib.load(root / manifest.at[case, "image"]).get_fdata(dtype=np.float32)
        logits = segment_tensor(model, spec, image).astype(np.float64)
        np.testing.assert_array_equal(np.asarray(nib.load(out / mask).dataobj), logits.argmax(axis=0))
        np.testing.assert_allclose(nib.load(out / prob_map).get_fdata(),
                                   softmax(logits / evaluation.temperature, axis=0)[1], atol=1e-6)
        before.append(softmax(logits, axis=0)[1].ravel())
        truths.append(np.asarray(nib.load(root / manifest.at[case, "label"]).dataobj).ravel().astype(int))
    expected = binary_calibration_error(torch.tensor(np.concatenate(before)), torch.tensor(np.concatenate(truths)),
                                        n_bins=15).item()
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["temperature"] == evaluation.temperature
    assert calibration["before"]["voxel_ece"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", sorted(SEGMENTERS))
def test_every_network_trains_a_step_on_2d_patches(name):
    patch = (64, 64) if name == "swinunetr" else (32, 32)
    network = build_segmenter(name, spatial_dims=2, in_channels=1, num_classes=3, patch_size=patch,
                              kwargs=segmenter_kwargs(name, patch_size=patch))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    image, label = torch.randn(2, 1, *patch), torch.randint(0, 3, (2, 1, *patch))
    loss_fn = build_seg_loss("dice_ce", None)
    before = loss_fn(network(image), label)
    before.backward()
    optimizer.step()
    assert torch.isfinite(before)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


def test_losses_match_their_definitions():
    torch.manual_seed(0)
    logits, label = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    prob, onehot = logits.softmax(dim=1), F.one_hot(label[:, 0], 3).permute(0, 3, 1, 2).float()
    soft_dice = 1 - (2 * (prob * onehot).sum((2, 3)) + 1e-5) / (prob.sum((2, 3)) + onehot.sum((2, 3)) + 1e-5)
    ce = F.cross_entropy(logits, label[:, 0])
    torch.testing.assert_close(build_seg_loss("dice", None)(logits, label), soft_dice.mean())
    torch.testing.assert_close(build_seg_loss("cross_entropy", None)(logits, label), ce)
    torch.testing.assert_close(build_seg_loss("dice_ce", None)(logits, label), soft_dice.mean() + ce)
    weights = torch.tensor([0.2, 1.0, 3.0])
    torch.testing.assert_close(build_seg_loss("cross_entropy", weights)(logits, label),
                               F.cross_entropy(logits, label[:, 0], weight=weights))


def test_disk_cache_trains_the_same_model_as_memory_cache(workspace, seg2d_dataset):
    finals = {}
    for cache in ("memory", "disk"):
        config = load_config(overrides=[*SEG, "train.epochs=1", "train.patch_size=[32, 32]", f"train.cache={cache}",
                                        f"registry.experiment=cache-{cache}"], environ={})
        train_segmenter(manifest_path=seg2d_dataset, data_version="v1", config=config, params_out=workspace / cache)
        finals[cache] = torch.load(workspace / cache / "rank0.pt")
    assert any((paths.medflow_home() / "cache").rglob("*.pt"))  # PersistentDataset wrote its samples
    for key in finals["memory"]:
        torch.testing.assert_close(finals["memory"][key], finals["disk"][key])


def test_default_patch_fits_the_image_and_the_network():
    assert default_patch((24, 24, 8), divisor=8) == (24, 24, 8)
    assert default_patch((200, 150, 7), divisor=16) == (96, 96, 16)  # at most 96; a thin axis is padded to 16
    assert default_patch((40, 40), divisor=32, least=64) == (64, 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.patch_size=[16, 16, 8]"], r"train.patch_size \[16, 16, 8\] has 3 sides but the images are 2D; give 2 sides"),
        (["train.model_kwargs={spatial_dims: 3}"], "train.model_kwargs.spatial_dims is 3 but the images are 2D"),
        (["train.model=swinunetr", "train.patch_size=[32, 32]"],
         r"swinunetr needs patch sides divisible by 32 and at least 64; train.patch_size \[32, 32\] is not: "
         r"set train.patch_size=\[64, 64\]"),
        (["train.patch_size=[30, 30]"], r"unet needs patch sides divisible by 8; .* set train.patch_size=\[24, 24\]"),
        (["train.model=unetr", "train.model_kwargs={hidden_size: 100}"], "network 'unetr' refused train.model_kwargs"),
        (["train.model=densenet"], "network 'densenet' is not a segmentation network"),
        (["train.model=unnet"], "unknown network 'unnet'; did you mean 'unet'"),
    ],
)
def test_a_config_the_data_cannot_take_fails_before_training(workspace, seg2d_dataset, overrides, message):
    config = load_config(overrides=[*SEG, *overrides], environ={})
    with pytest.raises(ConfigError, match=message):
        train_segmenter(manifest_path=seg2d_dataset, data_version="v1", config=config)
    assert not (paths.medflow_home() / "checkpoints").exists()  # nothing trained, nothing logged


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.loss=dice"], "train.loss is 'dice', a segmentation loss, but data.task is 'classification'"),
        (["data.task=segmentation", "train.model=unet", "promotion.non_inferiority=[{metric: auc, margin: 0.02}]"],
         "promotion.non_inferiority compares classifiers"),
    ],
)
def test_a_loss_or_policy_that_does_not_fit_the_task_is_refused_at_once(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_trainable(load_config(overrides=overrides, environ={}))


def test_a_dataset_ingested_for_another_task_is_refused_with_what_it_holds(workspace, seg2d_dataset, small_dataset):
    from components.training.classification import train_classifier

    classify = load_config(overrides=["registry.experiment=wrong-task"], environ={})
    with pytest.raises(ConfigError, match=r"data.task is 'classification' but labels of case\(s\) .* are not classes "
                                          r"0..1 \(first: 'labels/.*nii.gz'\); was the dataset ingested for another task"):
        train_classifier(manifest_path=seg2d_dataset, data_version="v1", config=classify)
    segment = load_config(overrides=[*SEG, "train.patch_size=[32, 32]"], environ={})
    with pytest.raises(ConfigError, match=r"data.task is 'segmentation' but case\(s\) .* have no mask \(label '[01]'\)"):
        train_segmenter(manifest_path=small_dataset, data_version="v1", config=segment)


def test_balanced_class_weights_are_scikit_learns_over_every_voxel_of_the_training_masks(workspace, seg2d_dataset):
    from sklearn.utils.class_weight import compute_class_weight

    from components.training.segmentation import segmentation_recipe

    config = load_config(overrides=[*SEG, "train.patch_size=[32, 32]", "train.class_weights=balanced"], environ={})
    recipe = segmentation_recipe(seg2d_dataset, config, torch.device("cpu"))
    manifest = load_manifest(seg2d_dataset)
    voxels = np.concatenate([np.asarray(nib.load(seg2d_dataset.parent / p).dataobj).ravel()
                             for p in manifest.loc[manifest["split"] == "train", "label"]]).astype(int)
    expected = compute_class_weight("balanced", classes=np.arange(2), y=voxels)
    np.testing.assert_allclose(recipe.loss.cross_entropy.weight.numpy(), expected, rtol=1e-6)
