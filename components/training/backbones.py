"""Pretrained backbones read from local files: a Hugging Face folder (loaded by ``transformers``' Auto
classes, local files only), a state_dict of the MONAI network named in ``train.model``, or a
classifier or an encoder registered in MLflow (``models:/NAME@alias`` or ``models:/NAME/VERSION``: a
classifier medflow trained, or an encoder ``medflow pretrain`` pretrained; an alias is pinned to its version
before a run starts, :func:`pin_backbone`, so the step key names the version).

A backbone is an *encoder*: images (B, C, H, W) in, features (B, D) out. For a
Hugging Face model that is its pooled output (the layer-normed [CLS] token of a
ViT or DINOv2, the pooled map of a ConvNet); for a MONAI classifier it is the
network with its last linear layer (the head) removed. The encoder's
preprocessing follows the checkpoint: its input size and channels, and its
normalisation from ``preprocessor_config.json`` (ImageNet's when absent).

Nothing is downloaded: Hugging Face folders load with ``local_files_only=True``.
The served model never needs the original file: the checkpoint medflow logs holds
every weight, and the encoder is rebuilt from its description (a Hugging Face
``config.json`` as a dict, or a MONAI network name and arguments) before they load.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components import paths, steps
from components.lineage import TAG_BACKBONE, TAG_DATA_VERSION
from components.config import REGISTRY_PREFIX, BackboneConfig, RunConfig, Task
from components.errors import ConfigError
from components.training.encoders import FORMAT_MAE, build_mae_encoder
from components.training.ensemble import ENSEMBLE, FoldEnsemble, FoldFeatures
from components.training.heads import BackboneClassifier, KNNHead, lora_targets
from components.training.loop import CHECKPOINT_DIR
from components.training.models import build_classifier, build_segmenter, classifier_kwargs
from components.training.preprocess import PreprocessSpec
from components.training.pretrained import (
    FORMAT_HF,
    FORMAT_MONAI,
    FORMAT_REGISTRY,
    HuggingFaceEncoder,
    LoadReport,
    check_patches,
    classification_head,
    detect_format,
    hf_config,
    hf_preprocess,
    load_matching,
    read_state_dict,
    strip_head,
    weight_files,
)

FROZEN_REGIMES = ("linear_probe", "knn")
LATEST = "latest"  # models:/NAME@latest or models:/NAME/latest: the newest version (MLflow reserves the alias)
ENCODER_TASK = "encoder"  # model.json of a pretrained encoder (components.pretraining)


@dataclass
class Backbone:
    """A loaded encoder and what medflow needs to train on it, serve it and trace it.

    Attributes:
        encoder: images (B, C, H, W) -> features (B, feature_dim), with the checkpoint's weights.
        feature_dim: D.
        spec: the preprocessing the checkpoint expects.
        format: ``huggingface`` or ``monai``.
        description: what rebuilds the encoder without the file (:func:`build_encoder`).
        weights: file name -> sha256 of every weights file read.
        report: how the weights met the network.
        arch: the architecture (a transformers model type or a MONAI network name).
        lineage: further ``medflow.backbone.*`` tags (a registered model's version and run).
    """

    encoder: nn.Module
    feature_dim: int
    spec: PreprocessSpec
    format: str
    description: dict
    weights: dict[str, str]
    report: LoadReport
    arch: str = ""
    lineage: dict[str, str] = field(default_factory=dict)

    def tags(self, regime: str) -> dict[str, str]:
        """``medflow.backbone.*`` lineage tags of the training run and the model version."""
        return {**backbone_tags(backbone_format=self.format, arch=self.arch, regime=regime, weights=self.weights),
                **self.lineage}


def backbone_tags(*, backbone_format: str, arch: str, regime: str, weights: dict[str, str]) -> dict[str, str]:
    """``medflow.backbone.*``: the format, architecture, regime and the sha256 of the weights (each file's too)."""
    return {
        f"{TAG_BACKBONE}format": backbone_format,
        f"{TAG_BACKBONE}arch": arch,
        f"{TAG_BACKBONE}regime": regime,
        f"{TAG_BACKBONE}sha256": weights_digest(weights),
        **{f"{TAG_BACKBONE}sha256.{name}": digest for name, digest in sorted(weights.items())},
    }


def weights_digest(weights: dict[str, str]) -> str:
    """One sha256 for a checkpoint's weights files: the file's own for one file, else over name and digest."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    return hashlib.sha256("".join(f"{n}\0{d}\0" for n, d in sorted(weights.items())).encode()).hexdigest()


def _load_hf(folder: Path, backbone: BackboneConfig) -> Backbone:
    from transformers import AutoModel  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # medflow shows its own progress; the per-load bar is noise in the log
    model_config = hf_config(folder)
    side, channels, mean, std = hf_preprocess(folder, model_config, backbone.image_size)
    check_patches(getattr(model_config, "patch_size", None), side, str(folder))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"train.backbone.source {folder} does not load: {(first[0] if first else '')[:300]}") from exc
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        key = mismatched[0][0] if isinstance(mismatched[0], (list, tuple)) else mismatched[0]
        raise ConfigError(f"train.backbone.source {folder} does not fit its config.json: {key} has another shape")
    total = len(model.state_dict())
    missing = tuple(info.get("missing_keys") or ())
    if total and len(missing) >= total:
        raise ConfigError(f"train.backbone.source {folder} matches none of the {model_config.model_type} "
                          "network's weights")
    encoder = HuggingFaceEncoder(model).eval()
    with torch.no_grad():
        feature_dim = int(encoder(torch.zeros(1, channels, side, side)).shape[1])
    weights = {p.name: steps.file_sha256(p) for p in weight_files(folder, FORMAT_HF)}
    return Backbone(
        encoder=encoder, feature_dim=feature_dim,
        spec=PreprocessSpec(spatial_size=(side, side), mean=0.0, std=1.0, channels=channels,
                            channel_mean=mean, channel_std=std),
        format=FORMAT_HF, arch=str(model_config.model_type),
        description={"format": FORMAT_HF, "config": model_config.to_dict(), "feature_dim": feature_dim},
        weights=weights,
        report=LoadReport(matched=total - len(missing), missing=missing,
                          unexpected=tuple(info.get("unexpected_keys") or ())),
    )


def _monai_description(config: RunConfig, side: int) -> dict:
    name = config.train.model
    return {"format": FORMAT_MONAI, "network": name, "num_classes": config.data.num_classes,
            "network_kwargs": classifier_kwargs(name, image_size=side, kwargs=config.train.model_kwargs)}


def _load_monai(path: Path, config: RunConfig, spec: PreprocessSpec) -> Backbone:
    description = _monai_description(config, spec.spatial_size[0])
    network = build_classifier(description["network"], spatial_dims=2, in_channels=1,
                               num_classes=description["num_classes"], kwargs=description["network_kwargs"])
    encoder, feature_dim, head = strip_head(network, description["num_classes"])  # the file's head stays out
    report = load_matching(encoder, read_state_dict(path), source=str(path))
    description["feature_dim"], description["head"] = feature_dim, head
    return Backbone(encoder=encoder.eval(), feature_dim=feature_dim, spec=spec, format=FORMAT_MONAI,
                    arch=config.train.model, description=description,
                    weights={path.name: steps.file_sha256(path)}, report=report)


def parse_model_uri(source: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@alias`` -> (NAME, alias, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION); the
    version may be ``latest``, and so may the alias: the newest version, as MLflow's ``models:/NAME/latest``.

    Raises:
        ConfigError: neither form.
    """
    rest = source.removeprefix(REGISTRY_PREFIX)
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and (version.isdigit() or version.lower() == LATEST):
            return name, None, version
    raise ConfigError(f"train.backbone.source {source!r} is not models:/NAME@alias or models:/NAME/VERSION")


def _registered_version(source: str) -> Any:
    from mlflow.exceptions import MlflowException  # noqa: PLC0415 (the registry only for this format)
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    name, alias, version = parse_model_uri(source)
    client = MlflowClient(paths.tracking_uri())
    try:
        if LATEST in (str(alias).lower(), str(version).lower()):  # MLflow's reserved name: the newest version
            newest = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), default=None)
            if newest is None:
                raise MlflowException(f"no version of {name}")
            return newest
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ConfigError(f"train.backbone.source {source}: the registry at {paths.tracking_uri()} has no model "
                          f"{name!r} with {what}; see medflow history, or give a file") from exc


def pin_backbone(config: RunConfig) -> RunConfig:
    """The config with a registered backbone's alias replaced by the version it points to now
    (``models:/NAME@champion`` -> ``models:/NAME/7``): versions do not change, so the training key,
    the logged config and the lineage name the weights the run used. Other configs come back as they are."""
    backbone = config.train.backbone
    if backbone is None or pinned_source(backbone.source) == backbone.source:
        return config
    train = config.train.model_copy(update={"backbone": backbone.model_copy(update={"source": pinned_source(
        backbone.source)})})
    return config.model_copy(update={"train": train})


def pinned_source(source: str) -> str:
    """A backbone source with a registered model's alias (or ``latest``) replaced by its version now; any other
    source as it is."""
    if not source.startswith(REGISTRY_PREFIX):
        return source
    name, alias, version = parse_model_uri(source)
    if alias is None and str(version).lower() != LATEST:
        return source
    return f"{REGISTRY_PREFIX}{name}/{_registered_version(source).version}"


def build_described(description: dict) -> nn.Module:
    """The network a checkpoint's ``model.json`` describes, with untrained weights: a MONAI classifier or
    segmentation network by name, or a backbone classifier (encoder and head)."""
    if description.get("network") == "backbone":
        return build_backbone_classifier(description)
    if description.get("task") == ENCODER_TASK:  # a pretrained encoder (medflow pretrain): features out
        return build_encoder(description["backbone"])
    if description.get("network") == ENSEMBLE:  # a k-fold study's folds as one model
        members = description["members"]
        return FoldEnsemble([build_described(m) for m in members], temperatures=[m["temperature"] for m in members],
                            statistics=[(m["preprocess"]["mean"], m["preprocess"]["std"]) for m in members],
                            multilabel=description.get("task") == "multilabel")
    common = {"spatial_dims": description["spatial_dims"], "in_channels": description["in_channels"],
              "num_classes": description["num_classes"], "kwargs": description.get("network_kwargs")}
    if description.get("task") == "segmentation":
        return build_segmenter(description["network"], patch_size=tuple(description["preprocess"]["patch_size"]),
                               **common)
    return build_classifier(description["network"], **common)


def _load_registered(source: str) -> Backbone:
    import mlflow  # noqa: PLC0415

    version = _registered_version(source)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=CHECKPOINT_DIR,
                                                      tracking_uri=paths.tracking_uri()))
    description = json.loads((folder / "model.json").read_text())
    lineage = {f"{TAG_BACKBONE}model": f"{version.name}/{version.version}", f"{TAG_BACKBONE}run": version.run_id,
               f"{TAG_BACKBONE}data_version": version.tags.get(TAG_DATA_VERSION, "")}
    if description.get("task") == ENCODER_TASK:
        encoder = build_described(description)
        encoder.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        encoder_description = dict(description["backbone"])
        return Backbone(
            encoder=encoder.eval(), feature_dim=int(encoder_description["feature_dim"]),
            spec=PreprocessSpec.from_dict(description["preprocess"]), format=FORMAT_REGISTRY,
            arch=str(encoder_description.get("network") or encoder_description.get("config", {}).get("model_type")),
            description=encoder_description,
            weights={"model.pt": steps.file_sha256(folder / "model.pt")},
            report=LoadReport(matched=len(encoder.state_dict()), missing=(), unexpected=()), lineage=lineage)
    if description.get("task") == "segmentation":
        raise ConfigError(f"train.backbone.source {source} is a segmentation network; a backbone for a classifier "
                          "must be a registered classifier")
    network = build_described(description)
    network.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    num_classes = int(description["num_classes"])
    if isinstance(network, BackboneClassifier):
        encoder, encoder_description = network.encoder, dict(description["backbone"])
        arch = str(encoder_description.get("network") or encoder_description.get("config", {}).get("model_type"))
    else:
        encoder, feature_dim, head = strip_head(network, num_classes)
        encoder_description = {"format": FORMAT_MONAI, "network": description["network"], "num_classes": num_classes,
                               "network_kwargs": description.get("network_kwargs") or {},
                               "feature_dim": feature_dim, "head": head}
        arch = description["network"]
    return Backbone(
        encoder=encoder.eval(), feature_dim=int(encoder_description["feature_dim"]),
        spec=PreprocessSpec.from_dict(description["preprocess"]), format=FORMAT_REGISTRY, arch=arch,
        description=encoder_description, weights={"model.pt": steps.file_sha256(folder / "model.pt")},
        report=LoadReport(matched=len(encoder.state_dict()), missing=(), unexpected=()),
        lineage=lineage,
    )


def load_backbone(config: RunConfig, *, data_spec: Callable[[], PreprocessSpec] | None = None) -> Backbone:
    """The configured backbone with its weights (``train.backbone``).

    Args:
        config: the run config; ``train.backbone`` must be set.
        data_spec: makes a MONAI state_dict's preprocessing (the data's, as for a network trained from
            scratch); a Hugging Face backbone brings its own.

    Raises:
        ConfigError: see :func:`check_backbone`.
    """
    backbone = config.train.backbone
    backbone_format = detect_format(backbone.source)
    if backbone_format == FORMAT_REGISTRY:
        return _load_registered(backbone.source)
    path = Path(backbone.source).expanduser()
    if backbone_format == FORMAT_HF:
        return _load_hf(path, backbone)
    side = backbone.image_size or config.data.image_size
    return _load_monai(path, config, data_spec() if data_spec else PreprocessSpec((side, side), mean=0.0, std=1.0))


def build_encoder(description: dict) -> nn.Module:
    """An encoder of the described architecture with untrained weights (the checkpoint's load over them)."""
    if description["format"] == FORMAT_MAE:  # a pretrained masked autoencoder's encoder half
        return build_mae_encoder(description["network_kwargs"])
    if description["format"] == FORMAT_HF:
        from transformers import AutoConfig, AutoModel  # noqa: PLC0415

        raw = dict(description["config"])
        model_config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        return HuggingFaceEncoder(AutoModel.from_config(model_config))
    network = build_classifier(description["network"], spatial_dims=2, in_channels=1,
                               num_classes=description["num_classes"], kwargs=description["network_kwargs"])
    network.set_submodule(description["head"], nn.Identity())
    return network


def build_backbone_classifier(description: dict) -> BackboneClassifier:
    """The classifier a backbone run's checkpoint describes (encoder, and its linear or k-NN head), untrained."""
    encoder_description = description["backbone"]
    feature_dim, num_classes = int(encoder_description["feature_dim"]), int(description["num_classes"])
    if description.get("regime") == "knn":
        head: nn.Module = KNNHead(int(description["knn"]["n_bank"]), feature_dim, num_classes,
                                  k=int(description["knn"]["k"]), multilabel=description.get("task") == "multilabel")
    else:
        head = nn.Linear(feature_dim, num_classes)
    return BackboneClassifier(build_encoder(encoder_description), head)


def penultimate(model: nn.Module, num_classes: int) -> nn.Module:
    """What a classifier computes before its head: a backbone classifier's encoder, or a copy of a MONAI
    classifier without its last linear layer (the features the shortcut audit probes); a fold ensemble's, every
    fold's side by side."""
    if isinstance(model, FoldEnsemble):
        return FoldFeatures(model, [penultimate(member, num_classes) for member in model.members])
    if isinstance(model, BackboneClassifier):
        return model.encoder
    encoder, _, _ = strip_head(copy.deepcopy(model), num_classes)
    return encoder


@contextmanager
def captured_features(model: nn.Module, num_classes: int) -> Iterator[list[torch.Tensor]]:
    """While open, what enters the classifier's head on each forward pass, flattened to (B, D): the features
    :func:`penultimate` computes, taken from the pass that predicts instead of a second one (a fold ensemble's
    heads each see their fold's: joined in fold order once the last has run)."""
    members = list(model.members) if isinstance(model, FoldEnsemble) else [model]
    heads = [m.head if isinstance(m, BackboneClassifier) else classification_head(m, num_classes)[1] for m in members]
    captured: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def _hook(_module, args) -> None:
        pending.append(args[0].detach().float().reshape(len(args[0]), -1).cpu())
        if len(pending) == len(heads):
            captured.append(torch.cat(pending, dim=1))
            pending.clear()

    handles = [head.register_forward_pre_hook(_hook) for head in heads]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def check_backbone(config: RunConfig) -> None:
    """Refuse, before any data is read, a backbone medflow cannot train on as configured: a missing or
    unknown source, weights that do not fit the network, a patch size that does not tile the image,
    ``lora`` without attention layers, ``knn``/``linear_probe``/``lora`` for segmentation.

    Raises:
        ConfigError: one line naming what to change.
    """
    backbone = config.train.backbone
    if backbone is None:
        return
    backbone_format = detect_format(backbone.source)
    if config.data.task is Task.SEGMENTATION:
        if backbone.regime != "finetune":
            raise ConfigError(f"train.backbone.regime {backbone.regime!r} is for classifiers; a segmentation "
                              "network starts from a state_dict with regime finetune")
        if backbone_format != FORMAT_MONAI:
            raise ConfigError(f"a segmentation network starts from a state_dict of the MONAI network "
                              f"{config.train.model!r}; train.backbone.source {backbone.source} is not one")
        return
    loaded = load_backbone(config)
    if backbone.regime == "lora":
        lora_targets(loaded.encoder, backbone, network=loaded.arch)


def init_segmenter(network: nn.Module, config: RunConfig) -> tuple[LoadReport, dict[str, str]]:
    """Start a segmentation network from ``train.backbone.source``, a state_dict of the same MONAI network
    (e.g. SwinUNETR's self-supervised encoder): the tensors it has load, the rest keep their initialisation.
    Returns how the weights met the network and the run's ``medflow.backbone.*`` tags."""
    path = Path(config.train.backbone.source).expanduser()
    report = load_matching(network, read_state_dict(path), source=str(path))
    tags = backbone_tags(backbone_format=FORMAT_MONAI, arch=config.train.model, regime=config.train.backbone.regime,
                         weights={path.name: steps.file_sha256(path)})
    return report, tags


def describe_report(report: LoadReport) -> str:
    """One line for the log: how many tensors loaded, and the first missing and unexpected names."""
    parts = [f"{report.matched} tensors loaded"]
    if report.missing:
        parts.append(f"{len(report.missing)} missing (first {report.missing[0]})")
    if report.unexpected:
        parts.append(f"{len(report.unexpected)} unexpected (first {report.unexpected[0]})")
    return ", ".join(parts)
