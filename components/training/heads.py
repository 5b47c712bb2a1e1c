"""The heads and adapters a backbone trains with: the encoder+head classifier every regime logs, the
k-nearest-neighbour head, peft's LoRA adapters on the attention projections, and layer-wise learning-rate
decay for fine-tuning (see :mod:`components.training.transfer` for the regimes)."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from components.config import BackboneConfig
from components.errors import ConfigError

# The attention projections LoRA adapts by default: Hugging Face ViT/DINOv2 (query/key/value, or
# q_proj/k_proj/v_proj), fused ones (qkv: MONAI's and timm's ViT blocks).
ATTENTION_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "qkv")

class BackboneClassifier(nn.Module):
    """An encoder and a head: logits = head(encoder(images))."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class KNNHead(nn.Module):
    """k nearest neighbours (Euclidean) among the training features; the output is the log of the
    neighbours' vote share per class (the logit of each label's share for multi-label), so that the
    softmax (sigmoid) every stage applies gives back the votes, as scikit-learn's
    ``KNeighborsClassifier.predict_proba`` with uniform weights computes them.

    torch rather than scikit-learn: the bank travels in the model's state_dict (tensors only, no pickle)
    and the served pyfunc needs nothing else."""

    EPS = 1e-6

    def __init__(self, n_bank: int, feature_dim: int, num_classes: int, *, k: int, multilabel: bool) -> None:
        super().__init__()
        self.k, self.multilabel = k, multilabel
        self.register_buffer("bank", torch.zeros(n_bank, feature_dim))
        self.register_buffer("targets", torch.zeros(n_bank, num_classes))

    def votes(self, features: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(features.float(), self.bank)
        nearest = distances.topk(min(self.k, len(self.bank)), largest=False).indices
        return self.targets[nearest].mean(dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        share = self.votes(features).clamp(self.EPS, 1 - self.EPS if self.multilabel else 1.0)
        return torch.log(share) - (torch.log1p(-share) if self.multilabel else 0.0)


def lora_targets(encoder: nn.Module, backbone: BackboneConfig, *, network: str) -> list[str]:
    """The module-name suffixes LoRA adapts: ``train.backbone.lora_targets``, else the attention projections.

    Raises:
        ConfigError: the network has no such linear layers.
    """
    wanted = backbone.lora_targets or ATTENTION_PROJECTIONS
    linear = [name for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    found = sorted({suffix for suffix in wanted for name in linear if name == suffix or name.endswith(f".{suffix}")})
    if not found:
        what = f"the layers {list(backbone.lora_targets)}" if backbone.lora_targets else "attention projections"
        raise ConfigError(f"train.backbone.regime is 'lora' but {network} has no {what} to adapt; use finetune "
                          "or linear_probe, or name its linear layers in train.backbone.lora_targets")
    return found


def add_lora(encoder: nn.Module, backbone: BackboneConfig, *, network: str) -> nn.Module:
    """The encoder with peft's LoRA adapters on its attention projections; only the adapters train."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 (peft only for lora)

    targets = lora_targets(encoder, backbone, network=network)
    return get_peft_model(encoder, LoraConfig(r=backbone.lora_rank, lora_alpha=backbone.lora_alpha,
                                              lora_dropout=backbone.lora_dropout, target_modules=targets))


def merge_lora(network: BackboneClassifier) -> BackboneClassifier:
    """A copy of ``network`` with its LoRA adapters merged into the weights (a plain encoder again)."""
    merged = copy.deepcopy(network)
    merged.encoder = merged.encoder.merge_and_unload()
    return merged


_LAYER = re.compile(r"\.(?:layer|layers|blocks|block)\.(\d+)\.")


def layer_decay_groups(network: BackboneClassifier, *, lr: float, decay: float) -> list[dict]:
    """Parameter groups for layer-wise learning-rate decay (BEiT, MAE): the head and final norms at ``lr``,
    transformer layer i of L at ``lr * decay ** (L - i)``, the embeddings at ``lr * decay ** (L + 1)``.
    (PyTorch's optimizers take groups but no rule that assigns layers to them.)"""
    named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    indices = [int(m.group(1)) for n, _ in named if (m := _LAYER.search(n))]
    depth = max(indices) + 1 if indices else 0
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for name, parameter in named:
        match = _LAYER.search(name)
        if name.startswith("head."):
            level = depth + 1
        elif match:
            level = int(match.group(1)) + 1
        elif "embed" in name:
            level = 0
        else:
            level = depth + 1
        groups.setdefault(level, []).append(parameter)
    return [{"params": params, "lr": lr * decay ** (depth + 1 - level)} for level, params in sorted(groups.items())]
