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


CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {
    "densenet": _densenet(nets.DenseNet),
    "densenet121": _densenet(nets.DenseNet121),
    "resnet18": _resnet(nets.resnet18),
    "resnet50": _resnet(nets.resnet50),
    "efficientnet-b0": _efficientnet("efficientnet-b0"),
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
