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
from monai.networks.utils import copy_model_state
from torch import nn

from components import paths, steps
from components.lineage import TAG_BACKBONE, TAG_DATA_VERSION
from components.config import BackboneConfig, RunConfig, Task
from components.errors import ConfigError
from components.training.encoders import FORMAT_MAE, build_mae_encoder
from components.training.ensemble import ENSEMBLE, FoldEnsemble, FoldFeatures
from components.training.heads import BackboneClassifier, KNNHead, lora_targets
from components.training.loop import CHECKPOINT_DIR
from components.training.models import build_classifier, build_segmenter, classifier_kwargs
from components.training.preprocess import PreprocessSpec

FORMAT_HF = "huggingface"
FORMAT_MONAI = "monai"
FORMAT_REGISTRY = "mlflow"
REGISTRY_PREFIX = "models:/"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
# ImageNet's normalisation: what a checkpoint without a preprocessor_config.json was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FROZEN_REGIMES = ("linear_probe", "knn")
LATEST = "latest"  # models:/NAME@latest or models:/NAME/latest: the newest version (MLflow reserves the alias)
ENCODER_TASK = "encoder"  # model.json of a pretrained encoder (components.pretraining)


@dataclass(frozen=True)
class LoadReport:
    """How a state_dict met the network: keys loaded, the network's keys it lacks, keys the network lacks."""

    matched: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"matched": self.matched, "missing": list(self.missing), "unexpected": list(self.unexpected)}


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


class HuggingFaceEncoder(nn.Module):
    """A ``transformers`` vision model as an encoder: its pooled output (else the first token), flattened."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).flatten(1)


def detect_format(source: str) -> str:
    """``huggingface`` for a folder with ``config.json``, ``monai`` for a state_dict file.

    Raises:
        ConfigError: the path does not exist or is no known format, saying what is expected.
    """
    if source.startswith(REGISTRY_PREFIX):
        return FORMAT_REGISTRY
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"train.backbone.source {source} does not exist; give a Hugging Face folder "
                          "(config.json + model.safetensors) or a state_dict file (.pt, .pth, .safetensors)")
    if path.is_dir():
        if (path / "config.json").is_file():
            if not any((path / name).is_file() for name in HF_WEIGHT_FILES):
                raise ConfigError(f"train.backbone.source {source} has config.json but no weights "
                                  f"(expected one of {', '.join(HF_WEIGHT_FILES)})")
            return FORMAT_HF
        raise ConfigError(f"train.backbone.source {source} is a folder of no known format: a Hugging Face folder "
                          "holds config.json and model.safetensors; a MONAI state_dict is one .pt/.pth/.safetensors file")
    if path.suffix in STATE_DICT_SUFFIXES:
        return FORMAT_MONAI
    raise ConfigError(f"train.backbone.source {source} is no known format: expected a Hugging Face folder or a "
                      f"state_dict file ({', '.join(STATE_DICT_SUFFIXES)})")


def _weight_files(path: Path, backbone_format: str) -> list[Path]:
    if backbone_format == FORMAT_MONAI:
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state_dict file (safetensors, or torch.save without pickled code); a ``state_dict`` or
    ``model`` entry is unwrapped and a DistributedDataParallel ``module.`` prefix dropped.

    Raises:
        ConfigError: the file cannot be read as tensors.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # noqa: PLC0415 (only for this format)

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch and safetensors raise many kinds for a bad file)
        raise ConfigError(f"train.backbone.source {path} is not a readable state_dict: "
                          f"{str(exc).splitlines()[0][:200]}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"train.backbone.source {path} holds no state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(network: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> LoadReport:
    """Load the tensors of ``state`` whose names the network has; the rest of the network keeps its
    initialisation (``missing``) and the rest of the file is left out (``unexpected``: a removed head's).

    Raises:
        ConfigError: a shape that does not fit (naming the first such key) or nothing matched.
    """
    own = network.state_dict()
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise ConfigError(f"train.backbone.source {source} does not fit the network: {key} has shape "
                              f"{tuple(tensor.shape)} in the file but {tuple(own[key].shape)} in the network; "
                              "is train.model (and train.model_kwargs) the network the weights were saved from?")
    if not any(k in own for k in state):
        raise ConfigError(f"train.backbone.source {source} matches none of the network's weights (file: "
                          f"{next(iter(state), 'empty')}, network: {next(iter(own), 'none')}); "
                          "is train.model the network the weights were saved from?")
    _, updated, unchanged = copy_model_state(network, state, inplace=True)  # MONAI: the tensors both have
    return LoadReport(matched=len(updated), missing=tuple(unchanged), unexpected=tuple(k for k in state if k not in own))


def _head(network: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The classification head of a MONAI classifier: its last linear layer with ``num_classes`` outputs."""
    heads = [(name, m) for name, m in network.named_modules() if isinstance(m, nn.Linear)
             and m.out_features == num_classes]
    if not heads:
        raise ConfigError(f"found no classification head ({num_classes} outputs) to take features before")
    return heads[-1]


def strip_head(network: nn.Module, num_classes: int) -> tuple[nn.Module, int, str]:
    """The network without its classification head (its last linear layer with ``num_classes``
    outputs, replaced by the identity): (encoder, feature dimension, the head's module name)."""
    name, head = _head(network, num_classes)
    network.set_submodule(name, nn.Identity())
    return network, head.in_features, name


def _hf_preprocess(folder: Path, model_config: Any, image_size: int | None) -> tuple[int, int, tuple, tuple]:
    """(side, channels, mean, std) from the checkpoint's preprocessor_config.json and config.json."""
    processor = {}
    if (folder / "preprocessor_config.json").is_file():
        processor = json.loads((folder / "preprocessor_config.json").read_text())
    side = image_size
    for key in ("crop_size", "size"):
        value = processor.get(key)
        if side is None and isinstance(value, dict):
            side = value.get("height") or value.get("shortest_edge")
        elif side is None and isinstance(value, int):
            side = value
    side = int(side or getattr(model_config, "image_size", 224) or 224)
    channels = int(getattr(model_config, "num_channels", 3) or 3)
    mean = tuple(float(v) for v in processor.get("image_mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in processor.get("image_std", IMAGENET_STD))
    if len(mean) != channels:
        mean, std = (mean[0],) * channels, (std[0],) * channels
    return side, channels, mean, std


def _check_patches(patch: Any, side: int, source: str) -> None:
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if patch and side % int(patch):
        below, above = side // int(patch) * int(patch), (side // int(patch) + 1) * int(patch)
        raise ConfigError(f"the backbone's patch size {patch} does not tile image side {side} ({source}): set "
                          f"train.backbone.image_size to {below or above} or {above}")


def _hf_config(folder: Path) -> Any:
    from transformers import AutoConfig  # noqa: PLC0415 (transformers only for Hugging Face backbones)

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"train.backbone.source {folder}: config.json is not a transformers config: "
                          f"{str(exc).splitlines()[0][:200]}") from exc


def _load_hf(folder: Path, backbone: BackboneConfig) -> Backbone:
    from transformers import AutoModel  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # medflow shows its own progress; the per-load bar is noise in the log
    model_config = _hf_config(folder)
    side, channels, mean, std = _hf_preprocess(folder, model_config, backbone.image_size)
    _check_patches(getattr(model_config, "patch_size", None), side, str(folder))
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
    weights = {p.name: steps.file_sha256(p) for p in _weight_files(folder, FORMAT_HF)}
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
    heads = [m.head if isinstance(m, BackboneClassifier) else _head(m, num_classes)[1] for m in members]
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
