"""MONAI networks by name."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from monai.networks import nets
from torch import nn

from components.errors import ConfigError


def _densenet(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        return factory(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)

    return build


def _resnet(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        return factory(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=out_channels, **kwargs)

    return build


def _efficientnet(variant: str) -> Callable[..., nn.Module]:
    def build(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        kwargs.setdefault("pretrained", False)  # weights cannot be downloaded at run time
        return nets.EfficientNetBN(
            variant, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=out_channels, **kwargs
        )

    return build


class LogitsOnly(nn.Module):
    """MONAI's ViT returns (logits, hidden states); the training and serving code want the logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)[0]


def _vit(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    return LogitsOnly(nets.ViT(in_channels=in_channels, spatial_dims=spatial_dims, classification=True,
                               num_classes=out_channels, post_activation=None, **kwargs))


# A small ViT (ViT-Tiny widths) that trains on a CPU; any MONAI ViT argument overrides it.
VIT_DEFAULTS = {"hidden_size": 192, "mlp_dim": 768, "num_layers": 6, "num_heads": 3}


def classifier_kwargs(name: str, *, image_size: int, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The constructor arguments a network is built with: the config's, plus what the data implies.

    A ViT needs the image size and a patch size (a quarter of the side, at most 16, unless given).
    """
    given = dict(kwargs or {})
    if name != "vit":
        return given
    chosen = {**VIT_DEFAULTS, "img_size": image_size, "patch_size": min(16, max(1, image_size // 4)), **given}
    if image_size % int(chosen["patch_size"]):
        divisors = [d for d in range(2, min(image_size, 32) + 1) if image_size % d == 0]
        raise ConfigError(
            f"a ViT needs patches that tile the image: patch_size {chosen['patch_size']} does not divide "
            f"data.image_size {image_size}; choose train.model_kwargs.patch_size among {divisors}"
        )
    return chosen


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "densenet": _densenet(nets.DenseNet),
    "densenet121": _densenet(nets.DenseNet121),
    "resnet18": _resnet(nets.resnet18),
    "resnet50": _resnet(nets.resnet50),
    "efficientnet-b0": _efficientnet("efficientnet-b0"),
    "vit": _vit,
}


def build_classifier(
    name: str, *, spatial_dims: int, in_channels: int, num_classes: int, kwargs: dict[str, Any] | None = None
) -> nn.Module:
    """A MONAI classification network.

    Args:
        name: one of :data:`CLASSIFIERS`.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: output logits.
        kwargs: extra keyword arguments of the MONAI constructor.

    Raises:
        ConfigError: unknown name ("did you mean ...") or arguments the network refuses.
    """
    if name not in CLASSIFIERS:
        hint = difflib.get_close_matches(name, list(CLASSIFIERS), n=1)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        raise ConfigError(f"unknown network {name!r}; {suggestion}choices: {', '.join(CLASSIFIERS)}")
    try:
        return CLASSIFIERS[name](
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **dict(kwargs or {})
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"network {name!r} refused train.model_kwargs {kwargs}: {exc}") from exc
