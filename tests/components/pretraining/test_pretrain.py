"""Self-supervised pretraining as plain functions: the epoch loop's logging, checkpoints and resume, the
registered encoder loading as a backbone source with the last checkpoint's features, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from monai.losses import ContrastiveLoss
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from components import paths, steps
from components.config import load_config
from components.data.step import DatasetVersion
from components.errors import ConfigError, Interrupted
from components.inference.model import load_run_model
from components.pretraining import pretrain as pretrain_module
from components.pretraining.mae import MaskedReconstruction
from components.pretraining.pretrain import (
    check_pretrainable,
    embedding_spread,
    pretrain_encoder,
)
from components.pretraining.simclr import contrastive_loss
from components.pretraining.step import pretrain_dataset
from components.pretraining.views import view_transforms
from components.registry.encoder import register_encoder
from components.training import loop
from components.training.backbones import load_backbone
from components.training.distributed import launch_training
from components.training.encoders import build_mae_encoder, mae_kwargs
from components.training.forward import extract_features
from tests.components.training.test_backbones import dinov2_folder

TINY = ["pretrain.epochs=2", "pretrain.batch_size=8", "data.image_size=32", "data.name=small", "train.device=cpu",
        "pretrain.experiment=test-pretrain", "pretrain.knn_k=5"]


def _history(run_id: str, metric: str) -> list[float]:
    client = mlflow.MlflowClient(paths.tracking_uri())
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


def _dataset(manifest: Path) -> DatasetVersion:
    frame = pd.read_parquet(manifest)
    return DatasetVersion(name="small", manifest=manifest, version="v1", n_cases=len(frame),
                          n_patients=frame["patient_id"].nunique())


def test_the_loss_is_monais_nt_xent_between_the_two_views():
    projections = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    expected = ContrastiveLoss(temperature=0.3)(projections[:6], projections[6:])
    assert float(contrastive_loss(0.3)(projections, None)) == pytest.approx(float(expected))


def test_the_mae_loss_is_the_squared_error_over_the_hidden_patches_in_monais_patch_order():
    encoder = build_mae_encoder(mae_kwargs({"img_size": 16, "patch_size": 4, "hidden_size": 24, "mlp_dim": 48,
                                            "num_layers": 1, "num_heads": 2}, masking_ratio=0.5))
    images = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    errors = MaskedReconstruction(encoder)(images)
    torch.manual_seed(1)
    predicted, mask = encoder.reconstruct(images)
    target = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # (B, 16 patches, 16 pixels), row-major
    expected = (((predicted - target) ** 2).mean(-1) * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(errors, expected)
    assert mask.sum(1).tolist() == [8, 8, 8]  # half the patches hidden
    # MONAI numbers patches as unfold does: changing patch k's pixels changes token k alone
    changed = images.clone()
    changed[:, :, 4:8, 8:12] += 1.0  # row 1, column 2: patch 6
    with torch.no_grad():
        difference = (encoder.patch_embedding(changed) - encoder.patch_embedding(images)).abs().sum(-1)
    assert difference[0].nonzero().flatten().tolist() == [6]


def test_the_collapse_check_is_one_for_spread_embeddings_and_zero_for_collapsed_ones():
    spread = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    assert embedding_spread(spread) == pytest.approx(1.0, abs=0.05)
    normalised = F.normalize(spread, dim=1)
    assert embedding_spread(spread) == pytest.approx(float(normalised.std(dim=0).mean()) * math.sqrt(16))
    assert embedding_spread(torch.ones(100, 16) + 1e-6 * spread[:100]) < 1e-3


def test_the_two_views_of_an_image_differ_and_are_the_same_for_a_seed(small_dataset):
    config = load_config(overrides=TINY, environ={})
    spec = pretrain_module.PreprocessSpec(spatial_size=(32, 32), mean=0.0, std=1.0)
    image = str(small_dataset.parent / pd.read_parquet(small_dataset)["image"].iloc[0])
    transforms = view_transforms(spec, config.pretrain)
    transforms.set_random_state(seed=5)
    first = transforms({"image": image, "label": 0})["image"]
    transforms.set_random_state(seed=5)
    again = transforms({"image": image, "label": 0})["image"]
    assert tuple(first.shape) == (2, 32, 32)
    assert not torch.allclose(first[0], first[1]) and torch.equal(first, again)


@pytest.mark.parametrize(("method", "network"), [("simclr", "densenet"), ("mae", "vit")])
def test_pretraining_registers_an_encoder_that_loads_as_a_backbone_with_its_lineage(workspace, small_dataset, method,
                                                                                     network, recorded_trims):
    from components.training import heap

    trims = recorded_trims(pretrain_module)  # the validation offers the heap back after each batch, past the limit
    config = load_config(overrides=[*TINY, f"pretrain.method={method}", f"pretrain.model={network}"], environ={})
    report = workspace / "validation.json"
    report.write_text("{}")
    pretrained = pretrain_dataset(_dataset(small_dataset), report, config)

    run = mlflow.MlflowClient(paths.tracking_uri()).get_run(pretrained.run_id)
    assert run.data.tags["medflow.pretrain.method"] == method and run.info.run_name.startswith(f"pretrain {network}")
    assert "medflow.key.pretrain" in run.data.tags and run.data.tags["medflow.data_version"] == "v1"
    for metric in ("train_loss", "lr", "val_loss", "embedding_std"):
        assert len(_history(pretrained.run_id, metric)) == 2, metric
    # the checks describe the kept epoch: the lowest validation loss, and that epoch's spread
    losses = _history(pretrained.run_id, "val_loss")
    assert pretrained.val_loss == min(losses) and pretrained.best_epoch == losses.index(min(losses)) + 1
    assert pretrained.embedding_std == _history(pretrained.run_id, "embedding_std")[pretrained.best_epoch - 1]
    manifest = pd.read_parquet(small_dataset)
    assert run.data.params["n_train"] == str((manifest["split"] == "train").sum())
    n_val = int((manifest["split"] == "val").sum())
    batches = n_val // min(config.pretrain.batch_size, n_val)  # one trimmer per validation, called after each batch
    assert trims == [(epoch, heap.VALIDATION_FREE_HEAP) for epoch in (0, 1) for _ in range(batches)]

    # the k-NN check is scikit-learn's on the encoder's features, fitted on train, scored on val
    encoder, spec, description = load_run_model(pretrained.run_id)
    assert description["task"] == "encoder" and description["method"] == method
    cpu = torch.device("cpu")
    train, val = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(
        extract_features(encoder, spec, train, small_dataset.parent, cpu), train["label"].astype(int))
    expected = roc_auc_score(val["label"].astype(int),
                             knn.predict_proba(extract_features(encoder, spec, val, small_dataset.parent, cpu))[:, 1])
    assert pretrained.knn_auc == pytest.approx(expected)
    assert run.data.metrics["knn_val_auc"] == pytest.approx(expected)

    registered = register_encoder(pretrained, _dataset(small_dataset), config)
    assert (registered.name, registered.version) == ("small-encoder", "1")
    client = mlflow.MlflowClient(paths.tracking_uri())
    version = client.get_model_version("small-encoder", "1")
    assert version.tags["medflow.data_version"] == "v1"
    assert version.tags["medflow.pretrain.method"] == method and version.tags["medflow.pretrain.epochs"] == "2"
    assert register_encoder(pretrained, _dataset(small_dataset), config).version == "1"  # once per run

    # as a backbone source: the same features as the checkpoint's encoder, the encoder's lineage as tags
    probe = load_config(overrides=[*TINY, "train.backbone.source=models:/small-encoder@latest",
                                   "train.backbone.regime=linear_probe"], environ={})
    backbone = load_backbone(probe)
    images = np.stack([np.random.default_rng(k).normal(size=(32, 32)).astype(np.float32) for k in range(4)])
    transform = pretrain_module.PreprocessSpec.from_dict(spec.to_dict())
    assert backbone.spec == transform
    from components.training.preprocess import array_transform  # noqa: PLC0415

    batch = torch.stack([array_transform(spec)(image) for image in images])
    with torch.no_grad():  # the loaded encoder predicts in channels_last, the backbone in the layout fit will pick:
        # the same weights, whose sums oneDNN orders by layout (differences of a few 1e-5, relative)
        np.testing.assert_allclose(backbone.encoder(batch).numpy(), encoder(batch).numpy(), rtol=1e-4, atol=1e-5)
    tags = backbone.tags("linear_probe")
    assert tags["medflow.backbone.model"] == "small-encoder/1" and tags["medflow.backbone.run"] == pretrained.run_id
    assert tags["medflow.backbone.data_version"] == "v1"
    # and as the registered pyfunc: features (N, D)
    features = mlflow.pyfunc.load_model("models:/small-encoder/latest").predict(images)
    np.testing.assert_allclose(features, encoder(batch).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_pretraining_continues_a_hugging_face_backbone_whose_lineage_the_encoder_keeps(workspace, small_dataset,
                                                                                       tmp_path):
    folder = dinov2_folder(tmp_path / "dinov2")
    config = load_config(overrides=[*TINY, "pretrain.epochs=1", f"pretrain.source={folder}"], environ={})
    report = workspace / "validation.json"
    report.write_text("{}")
    pretrained = pretrain_dataset(_dataset(small_dataset), report, config)
    registered = register_encoder(pretrained, _dataset(small_dataset), config)
    version = mlflow.MlflowClient(paths.tracking_uri()).get_model_version(registered.name, registered.version)
    assert version.tags["medflow.backbone.format"] == "huggingface"
    assert version.tags["medflow.backbone.regime"] == "continued"
    assert version.tags["medflow.backbone.sha256"] == steps.file_sha256(folder / "model.safetensors")

    # the encoder is the Hugging Face network, moved by pretraining, with the checkpoint's own preprocessing
    source = load_backbone(load_config(overrides=[*TINY, f"train.backbone.source={folder}"], environ={}))
    continued = load_backbone(load_config(overrides=[*TINY, "train.backbone.source=models:/small-encoder@latest"],
                                          environ={}))
    assert continued.arch == "dinov2" and continued.spec == source.spec and continued.spec.channels == 3
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    encoder, _, _ = load_run_model(pretrained.run_id)
    with torch.no_grad():
        np.testing.assert_allclose(continued.encoder(batch).numpy(), encoder(batch).numpy(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(continued.encoder(batch), source.encoder(batch))


def test_a_pretraining_killed_after_an_epoch_resumes_into_the_same_run(workspace, small_dataset, monkeypatch):
    config = load_config(overrides=[*TINY, "pretrain.epochs=3", "train.checkpoint_interval_s=0"], environ={})
    whole = pretrain_encoder(manifest_path=small_dataset, data_version="v1", config=config)
    save = loop.save_checkpoint

    def save_then_stop(path, state):  # Ctrl-C right after epoch 2 is checkpointed
        save(path, state)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        pretrain_encoder(manifest_path=small_dataset, data_version="v1", config=config)
    killed = mlflow.MlflowClient(paths.tracking_uri()).search_runs(
        [mlflow.get_experiment_by_name("test-pretrain").experiment_id], order_by=["start_time DESC"])[0]
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = pretrain_encoder(manifest_path=small_dataset, data_version="v1", config=config)
    assert resumed.run_id == killed.info.run_id and resumed.resumed_from_epoch == 2
    assert _history(resumed.run_id, "train_loss") == pytest.approx(_history(whole.run_id, "train_loss"), rel=1e-5)
    assert _history(resumed.run_id, "val_loss") == pytest.approx(_history(whole.run_id, "val_loss"), rel=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["pretrain.batch_size=500"], r"manifest.parquet: pretraining needs at least pretrain.batch_size=500 train images "
                                 r"for one whole batch \(SimCLR contrasts the images of a batch\), got \d+; lower pretrain.batch_size or "
                                   r"add images"),
    (["pretrain.model=densenett"], r"did you mean 'densenet'"),
    (["pretrain.source=/nowhere/dinov2"], r"pretrain.source /nowhere/dinov2 does not exist; give a Hugging Face "
                                          r"folder"),
    (["pretrain.source=/nowhere/dinov2", "pretrain.method=mae", "pretrain.model=vit"],
     r"pretrain.source continues a backbone with SimCLR; pretrain.method mae starts its network from random weights"),
    (["pretrain.method=mae"], r"pretrain.method mae hides patches of a vision transformer; pretrain.model 'densenet' "
                              r"is a CNN: set pretrain.model=vit, or pretrain.method=simclr"),
])
def test_bad_pretraining_input_is_one_line_before_any_run(workspace, small_dataset, overrides, message):
    config = load_config(overrides=[*TINY, *overrides], environ={})
    with pytest.raises(ConfigError, match=message):
        pretrain_dataset(_dataset(small_dataset), workspace / "validation.json", config)
    assert mlflow.get_experiment_by_name("test-pretrain") is None or not mlflow.MlflowClient(
        paths.tracking_uri()).search_runs([mlflow.get_experiment_by_name("test-pretrain").experiment_id])


def test_volumes_are_refused_before_any_data_is_read():
    config = load_config(overrides=[*TINY, "data.task=segmentation", "data.name=ct"], environ={})
    with pytest.raises(ConfigError) as refused:
        check_pretrainable(config)
    assert str(refused.value) == ("pretraining takes 2D images; dataset 'ct' (data.task segmentation) holds volumes, "
                                  "whose views medflow cannot augment yet: pretrain on 2D images")


@pytest.mark.slow
def test_two_gloo_ranks_pretrain_alike_into_one_mlflow_run(workspace, small_dataset):
    config = load_config(overrides=[*TINY, "train.nproc_per_node=2"], environ={})
    result = launch_training(manifest_path=small_dataset, data_version="v1", config=config,
                             params_out=workspace / "params", entry="components.pretraining.pretrain:pretrain_encoder")
    rank0, rank1 = (torch.load(workspace / "params" / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    run = mlflow.MlflowClient(paths.tracking_uri()).get_run(result.run_id)
    assert run.data.params["world_size"] == "2" and run.data.tags["medflow.pretrain.method"] == "simclr"
    assert len(_history(result.run_id, "train_loss")) == 2
    artifacts = {a.path for a in mlflow.MlflowClient(paths.tracking_uri()).list_artifacts(result.run_id, "checkpoint")}
    assert artifacts == {"checkpoint/model.pt", "checkpoint/model.json"}


def test_an_unknown_method_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="pretrain.method"):
        load_config(overrides=["pretrain.method=dino"], environ={})
