"""Pretrained backbones: tiny checkpoints with random weights in each format (a transformers DINOv2
saved with save_pretrained, MONAI state_dicts by torch.save and safetensors), each regime, the served
model, lineage and every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file
from sklearn.neighbors import KNeighborsClassifier
from transformers import Dinov2Config, Dinov2Model

from components import paths, steps
from components.config import load_config
from components.errors import ConfigError
from components.inference.evaluate import evaluate_run
from components.inference.model import load_run_model
from components.registry.register import ALIAS_CHALLENGER, register_model
from components.training.backbones import captured_features, check_backbone, load_backbone, penultimate
from components.training.heads import BackboneClassifier, KNNHead, layer_decay_groups
from components.training.checkpoint import training_key
from components.training.classification import classification_recipe, train_classifier
from components.training.loop import select_device
from components.training.models import build_classifier
from components.training.preprocess import training_transforms
from components.training.train import check_trainable

DEMO_DENSENET = {"init_features": 16, "growth_rate": 16, "block_config": [2, 4, 4]}  # the packaged config's
TINY = ["train.epochs=3", "train.batch_size=16", "data.image_size=32", "registry.experiment=test-backbone",
        "train.cache=none"]


def dinov2_folder(folder: Path, *, image_size: int = 32, patch_size: int = 8, seed: int = 0,
                  processor: bool = True) -> Path:
    """A DINOv2 with random weights in Hugging Face format (config.json + model.safetensors)."""
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=image_size, patch_size=patch_size)
    Dinov2Model(config).save_pretrained(folder)
    if processor:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "BitImageProcessor", "crop_size": {"height": image_size, "width": image_size},
            "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    return folder


@pytest.fixture(scope="module")
def hf_backbone(tmp_path_factory) -> Path:
    return dinov2_folder(tmp_path_factory.mktemp("hf") / "dinov2-tiny")


def config_for(source: Path | str, regime: str, *extra: str):
    return load_config(overrides=[*TINY, f"train.backbone.source={source}", f"train.backbone.regime={regime}", *extra],
                       environ={})


def test_a_hugging_face_folder_loads_with_its_own_preprocessing_and_lineage(hf_backbone):
    backbone = load_backbone(config_for(hf_backbone, "linear_probe"))
    assert backbone.format == "huggingface" and backbone.arch == "dinov2" and backbone.feature_dim == 32
    assert backbone.spec.spatial_size == (32, 32) and backbone.spec.channels == 3
    assert backbone.spec.channel_mean == (0.5, 0.4, 0.3) and backbone.spec.channel_std == (0.2, 0.25, 0.3)
    assert backbone.report.matched == len(backbone.encoder.state_dict()) and not backbone.report.missing
    digest = steps.file_sha256(hf_backbone / "model.safetensors")
    assert backbone.tags("linear_probe")["medflow.backbone.sha256"] == digest


def test_features_equal_the_bare_transformers_forward_pass(hf_backbone, small_dataset):
    from components.training.transfer import extract_features

    backbone = load_backbone(config_for(hf_backbone, "linear_probe"))
    frame = pd.read_parquet(small_dataset).head(7)
    ours = extract_features(backbone.encoder, backbone.spec, frame, small_dataset.parent, torch.device("cpu"),
                            batch_size=3)
    bare = Dinov2Model.from_pretrained(hf_backbone, local_files_only=True).eval()
    transform = training_transforms(backbone.spec, augment=False)
    pixels = torch.stack([transform({"image": str(small_dataset.parent / p)})["image"] for p in frame["image"]])
    with torch.no_grad():
        expected = bare(pixel_values=pixels).pooler_output.numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_a_linear_probe_leaves_the_backbone_unchanged_while_the_head_learns(workspace, hf_backbone, small_dataset):
    config = config_for(hf_backbone, "linear_probe", "train.epochs=8", "train.lr=0.05")
    result = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    model, spec, description = load_run_model(result.run_id)
    original = Dinov2Model.from_pretrained(hf_backbone, local_files_only=True).state_dict()
    for key, value in original.items():
        torch.testing.assert_close(model.encoder.model.state_dict()[key], value, rtol=0, atol=0)
    client = MlflowClient(paths.tracking_uri())
    losses = [m.value for m in client.get_metric_history(result.run_id, "train_loss")]
    assert len(losses) == 8 and losses[-1] < losses[0]
    run = client.get_run(result.run_id)
    assert run.data.tags["medflow.backbone.regime"] == "linear_probe"
    assert run.data.tags["medflow.backbone.sha256"] == steps.file_sha256(hf_backbone / "model.safetensors")
    assert description["network"] == "backbone" and spec.channels == 3
    report = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="backbone/load_report.json")).read_text())
    assert report["matched"] == len(original) and report["missing"] == []


def test_a_second_probe_reuses_the_frozen_features(workspace, hf_backbone, small_dataset, monkeypatch):
    first = train_classifier(manifest_path=small_dataset, data_version="v1",
                             config=config_for(hf_backbone, "linear_probe", "train.epochs=1"))
    import components.training.transfer as transfer

    def never(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(transfer, "extract_features", never)
    second = train_classifier(manifest_path=small_dataset, data_version="v1",
                              config=config_for(hf_backbone, "knn", "train.backbone.knn_k=3"))
    params = lambda r: MlflowClient(paths.tracking_uri()).get_run(r.run_id).data.params  # noqa: E731
    assert params(first)["backbone.features_reused"] == "False"
    assert params(second)["backbone.features_reused"] == "True"


def test_knn_equals_scikit_learns_neighbours_on_the_same_features():
    rng = np.random.default_rng(0)
    bank, labels, queries = rng.normal(size=(60, 8)), rng.integers(0, 3, 60), rng.normal(size=(25, 8))
    head = KNNHead(60, 8, 3, k=7, multilabel=False)
    head.bank.copy_(torch.as_tensor(bank, dtype=torch.float32))
    head.targets.copy_(torch.as_tensor(np.eye(3)[labels], dtype=torch.float32))
    ours = torch.softmax(head(torch.as_tensor(queries, dtype=torch.float32)), dim=1).numpy()
    reference = KNeighborsClassifier(n_neighbors=7).fit(bank, labels).predict_proba(queries)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("network", ["monai", "backbone"])
def test_features_captured_while_predicting_equal_the_penultimate_encoders(network, hf_backbone):
    torch.manual_seed(0)
    if network == "monai":
        model = build_classifier("densenet", spatial_dims=2, in_channels=1, num_classes=3, kwargs=DEMO_DENSENET)
    else:
        encoder = load_backbone(config_for(hf_backbone, "linear_probe")).encoder
        model = BackboneClassifier(encoder, torch.nn.Linear(32, 3))
    model.eval()
    channels = 1 if network == "monai" else 3
    images = torch.randn(5, channels, 32, 32)
    with torch.no_grad(), captured_features(model, 3) as captured:
        logits = model(images)
        model(images[:2])
    expected = penultimate(model, 3)(images).reshape(5, -1)
    assert [tuple(t.shape) for t in captured] == [tuple(expected.shape), (2, expected.shape[1])]
    torch.testing.assert_close(captured[0], expected)
    assert captured[0].shape[1] != logits.shape[1]
    captured.clear()
    model(images)
    assert captured == []  # the hook is gone once the block ends


def test_a_fold_ensembles_features_are_every_folds_side_by_side_on_its_own_normalisation():
    """Embedding drift on a k-fold study's registered model: the features of every fold, not the last one's."""
    from components.training.ensemble import FoldEnsemble  # noqa: PLC0415

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(build_classifier("densenet", spatial_dims=2, in_channels=1, num_classes=3,
                                        kwargs=DEMO_DENSENET).eval())
    statistics = [(0.2, 1.5), (-0.4, 0.5)]
    model = FoldEnsemble(members, temperatures=[1.3, 0.8], statistics=statistics).eval()
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad(), captured_features(model, 3) as captured:
        model(images)
        (mean0, std0), parts = statistics[0], []
        for member, (mean, std) in zip(members, statistics):  # each fold sees the raw image on its own statistics
            parts.append(penultimate(member, 3)(images * (std0 / std) + (mean0 - mean) / std).reshape(4, -1))
        by_hand = torch.cat(parts, dim=1)
        computed = penultimate(model, 3)(images)
    assert len(captured) == 1 and by_hand.shape == (4, 2 * parts[0].shape[1])
    torch.testing.assert_close(captured[0], by_hand)
    torch.testing.assert_close(computed, by_hand)
    assert not torch.allclose(parts[0], parts[1])  # two folds, two different halves


def test_lora_trains_only_the_adapters_and_the_head(workspace, hf_backbone, small_dataset):
    config = config_for(hf_backbone, "lora", "train.epochs=2", "train.backbone.lora_rank=2")
    recipe = classification_recipe(small_dataset, config, select_device("cpu"))
    trainable = {n for n, p in recipe.network.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable) and any("lora_A" in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in recipe.network.named_parameters() if not p.requires_grad}

    result = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    model, _, _ = load_run_model(result.run_id)  # the adapters merged: a plain DINOv2 again
    assert not any("lora" in k for k in model.state_dict())
    original = Dinov2Model.from_pretrained(hf_backbone, local_files_only=True).state_dict()
    merged = model.encoder.model.state_dict()
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for k in changed)
    assert len(frozen_before) > 0
    tags = MlflowClient(paths.tracking_uri()).get_run(result.run_id).data.tags
    assert tags["medflow.backbone.regime"] == "lora"


def test_finetune_trains_every_weight_with_layer_wise_decay(hf_backbone):
    backbone = load_backbone(config_for(hf_backbone, "finetune"))
    network = BackboneClassifier(backbone.encoder, torch.nn.Linear(32, 2))
    groups = layer_decay_groups(network, lr=1.0, decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(network.named_parameters())
    assert rates[id(named["head.weight"])] == 1.0
    layer1 = next(p for n, p in named.items() if ".layer.1." in n)
    layer0 = next(p for n, p in named.items() if ".layer.0." in n)
    embedding = next(p for n, p in named.items() if "embeddings" in n)
    assert rates[id(layer1)] == 0.5 and rates[id(layer0)] == 0.25 and rates[id(embedding)] == 0.125


def test_a_monai_state_dict_loads_in_torch_and_safetensors_form(tmp_path):
    network = build_classifier("densenet", spatial_dims=2, in_channels=1, num_classes=2, kwargs=DEMO_DENSENET)
    state = network.state_dict()
    torch.save(state, tmp_path / "encoder.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "encoder.safetensors")
    for name in ("encoder.pt", "encoder.safetensors"):
        backbone = load_backbone(config_for(tmp_path / name, "linear_probe"))
        assert backbone.format == "monai" and backbone.arch == "densenet"
        # the head is not part of the encoder: its two tensors are "unexpected", everything else loaded
        assert set(backbone.report.unexpected) == {"class_layers.out.weight", "class_layers.out.bias"}
        assert backbone.report.matched == len(state) - 2 and not backbone.report.missing
        loaded = backbone.encoder.state_dict()
        torch.testing.assert_close(loaded["features.conv0.weight"], state["features.conv0.weight"])


def test_the_served_model_equals_the_evaluated_probabilities(workspace, hf_backbone, small_dataset):
    config = config_for(hf_backbone, "knn", "train.backbone.knn_k=5", "evaluate.n_bootstrap=20",
                        "evaluate.min_group_size=2", "registry.model_name=probe")
    trained = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=config,
                              out_dir=workspace / "eval")
    shutil.rmtree(hf_backbone.parent / "moved", ignore_errors=True)
    moved = hf_backbone.rename(hf_backbone.parent / "moved")  # the original file is gone when serving
    try:
        model = register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                               report_path=evaluation.report, config=config)
        version = MlflowClient(paths.tracking_uri()).get_model_version("probe", model.version)
        assert version.tags["medflow.backbone.format"] == "huggingface"
        assert version.tags["medflow.backbone.regime"] == "knn"
        manifest = pd.read_parquet(small_dataset)
        test = manifest[manifest["split"] == "test"].head(6)
        images = np.stack([nib.load(small_dataset.parent / p).get_fdata(dtype=np.float32) for p in test["image"]])
        served = mlflow.pyfunc.load_model(f"models:/probe@{ALIAS_CHALLENGER}")
        prob = served.predict(images)
    finally:
        moved.rename(hf_backbone)
    predictions = pd.read_parquet(evaluation.predictions).set_index("case_id")
    np.testing.assert_allclose(prob[:, 1], predictions.loc[test["case_id"], "prob"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_the_weights_content_is_part_of_the_training_key(tmp_path):
    folder = dinov2_folder(tmp_path / "a")
    config = config_for(folder, "linear_probe")
    before = training_key(config, "v1")
    assert training_key(config, "v1") == before
    dinov2_folder(tmp_path / "a", seed=1)  # other weights at the same path
    assert training_key(config, "v1") != before


def test_a_segmentation_network_starts_from_a_state_dict_of_itself(tmp_path):
    from components.training.backbones import init_segmenter
    from components.training.models import build_segmenter, segmenter_kwargs

    kwargs = segmenter_kwargs("unet", patch_size=(32, 32))
    source = build_segmenter("unet", spatial_dims=2, in_channels=1, num_classes=2, patch_size=(32, 32), kwargs=kwargs)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ssl.pt")
    target = build_segmenter("unet", spatial_dims=2, in_channels=1, num_classes=2, patch_size=(32, 32), kwargs=kwargs)
    config = load_config(overrides=["data.task=segmentation", "data.num_classes=2", "train.model=unet",
                                    "train.loss=dice", f"train.backbone.source={tmp_path / 'ssl.pt'}",
                                    "train.backbone.regime=finetune"], environ={})
    report, tags = init_segmenter(target, config)
    assert report.matched == len(source.state_dict()) and not report.missing and not report.unexpected
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    assert tags["medflow.backbone.arch"] == "unet"


@pytest.mark.parametrize(("setup", "overrides", "message"), [
    (lambda d: d / "nowhere", [], r"train.backbone.source .*nowhere does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", [], r"empty is a folder of no known format"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", [], r"notes.txt is no known format"),
    ("shape", [], r"features.conv0.weight has shape \(8, 1, 7, 7\) in the file but \(16, 1, 7, 7\)"),
    ("nothing", [], r"matches none of the network's weights \(file: encoder.unrelated"),
    ("hf", ["train.backbone.regime=lora", "train.backbone.lora_targets=[fc9]"], r"has no the layers \['fc9'\]"),
    ("densenet", ["train.backbone.regime=lora"], r"'lora' but densenet has no attention projections"),
    ("hf", ["train.backbone.image_size=36"], r"patch size 8 does not tile image side 36.*image_size to 32 or 40"),
    ("hf", ["data.task=segmentation", "train.model=unet", "train.loss=dice", "train.model_kwargs={}",
            "promotion.non_inferiority=[]", "train.backbone.regime=knn"],
     r"regime 'knn' is for classifiers"),
    ("hf", ["train.backbone.source=models:/encoder@latest"], r"has no model 'encoder' with alias 'latest'"),
    ("hf", ["train.backbone.source=models:/encoder"], r"is not models:/NAME@alias or models:/NAME/VERSION"),
])
def test_bad_backbones_are_refused_before_training_in_one_line(workspace, tmp_path, hf_backbone, setup, overrides,
                                                               message):
    if setup == "hf":
        source = hf_backbone
    elif setup == "shape":
        narrow = build_classifier("densenet", spatial_dims=2, in_channels=1, num_classes=2,
                                  kwargs={**DEMO_DENSENET, "init_features": 8, "growth_rate": 8})
        torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
        source = tmp_path / "narrow.pt"
    elif setup == "nothing":
        torch.save({"encoder.unrelated": torch.zeros(3)}, tmp_path / "other.pt")
        source = tmp_path / "other.pt"
    elif setup == "densenet":
        torch.save(build_classifier("densenet", spatial_dims=2, in_channels=1, num_classes=2,
                                    kwargs=DEMO_DENSENET).state_dict(), tmp_path / "densenet.pt")
        source = tmp_path / "densenet.pt"
    else:
        source = setup(tmp_path)
    config = load_config(overrides=[*TINY, f"train.backbone.source={source}", "train.backbone.regime=linear_probe",
                                    *overrides], environ={})
    with pytest.raises(ConfigError, match=message) as raised:
        check_trainable(config)
    assert "\n" not in str(raised.value)


def test_check_backbone_accepts_each_good_format(tmp_path, hf_backbone):
    torch.save(build_classifier("vit", spatial_dims=2, in_channels=1, num_classes=2,
                                kwargs={"img_size": 32, "patch_size": 8, "hidden_size": 192, "mlp_dim": 768,
                                        "num_layers": 6, "num_heads": 3}).state_dict(), tmp_path / "vit.pt")
    check_backbone(config_for(hf_backbone, "lora"))
    check_backbone(config_for(tmp_path / "vit.pt", "lora", "train.model=vit", "train.model_kwargs={}"))  # MONAI's ViT: its qkv projections


def test_a_registered_classifier_is_a_backbone_pinned_to_its_version(workspace, small_dataset):
    from components.training.backbones import pin_backbone
    from components.training.forward import extract_features

    base = load_config(overrides=[*TINY, "train.epochs=1", "evaluate.n_bootstrap=0", "evaluate.min_group_size=2",
                                  "registry.model_name=source-model"], environ={})
    trained = train_classifier(manifest_path=small_dataset, data_version="v1", config=base)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=base,
                              out_dir=workspace / "eval")
    register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                   report_path=evaluation.report, config=base)

    config = pin_backbone(config_for("models:/source-model@challenger", "linear_probe", "train.epochs=2",
                                     "registry.model_name=probe"))
    assert config.train.backbone.source == "models:/source-model/1"  # the alias pinned: the key names the version
    backbone = load_backbone(config)
    assert backbone.format == "mlflow" and backbone.arch == "densenet"
    frame = pd.read_parquet(small_dataset).head(5)
    source_model, source_spec, _ = load_run_model(trained.run_id)
    assert backbone.spec == source_spec  # the registered model's own preprocessing
    ours = extract_features(backbone.encoder, backbone.spec, frame, small_dataset.parent, torch.device("cpu"))
    layers = source_model.class_layers
    transform = training_transforms(source_spec, augment=False)
    images = torch.stack([transform({"image": str(small_dataset.parent / p)})["image"] for p in frame["image"]])
    with torch.no_grad():
        expected = torch.flatten(layers.pool(layers.relu(source_model.features(images))), 1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)

    probe = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    tags = MlflowClient(paths.tracking_uri()).get_run(probe.run_id).data.tags
    assert tags["medflow.backbone.model"] == "source-model/1" and tags["medflow.backbone.run"] == trained.run_id
    model, _, _ = load_run_model(probe.run_id)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2)
