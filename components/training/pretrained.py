"""Pretrained weights in files, before they become a backbone (:mod:`components.training.backbones`):
which format a source is, reading a state_dict safely (safetensors, or ``torch.load`` with
``weights_only``), loading the tensors whose names and shapes a network shares, removing a classifier's
head, and reading a Hugging Face folder's config and preprocessing (local files only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.networks.utils import copy_model_state
from torch import nn

from components.config import REGISTRY_PREFIX
from components.errors import ConfigError

FORMAT_HF = "huggingface"
FORMAT_MONAI = "monai"
FORMAT_REGISTRY = "mlflow"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
# ImageNet's normalisation: what a checkpoint without a preprocessor_config.json was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadReport:
    """How a state_dict met the network: keys loaded, the network's keys it lacks, keys the network lacks."""

    matched: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"matched": self.matched, "missing": list(self.missing), "unexpected": list(self.unexpected)}


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


def weight_files(path: Path, backbone_format: str) -> list[Path]:
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


def classification_head(network: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The classification head of a MONAI classifier: its last linear layer with ``num_classes`` outputs."""
    heads = [(name, m) for name, m in network.named_modules() if isinstance(m, nn.Linear)
             and m.out_features == num_classes]
    if not heads:
        raise ConfigError(f"found no classification head ({num_classes} outputs) to take features before")
    return heads[-1]


def strip_head(network: nn.Module, num_classes: int) -> tuple[nn.Module, int, str]:
    """The network without its classification head (its last linear layer with ``num_classes``
    outputs, replaced by the identity): (encoder, feature dimension, the head's module name)."""
    name, head = classification_head(network, num_classes)
    network.set_submodule(name, nn.Identity())
    return network, head.in_features, name


def hf_preprocess(folder: Path, model_config: Any, image_size: int | None) -> tuple[int, int, tuple, tuple]:
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


def check_patches(patch: Any, side: int, source: str) -> None:
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if patch and side % int(patch):
        below, above = side // int(patch) * int(patch), (side // int(patch) + 1) * int(patch)
        raise ConfigError(f"the backbone's patch size {patch} does not tile image side {side} ({source}): set "
                          f"train.backbone.image_size to {below or above} or {above}")


def hf_config(folder: Path) -> Any:
    from transformers import AutoConfig  # noqa: PLC0415 (transformers only for Hugging Face backbones)

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"train.backbone.source {folder}: config.json is not a transformers config: "
                          f"{str(exc).splitlines()[0][:200]}") from exc
