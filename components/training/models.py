"""MONAI networks by name: classifiers and segmentation networks, with defaults small
enough to train on a CPU (any constructor argument in ``train.model_kwargs`` overrides them)."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

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


class FirstOutput(nn.Module):
    """The first of a network's outputs: MONAI's ViT returns (logits, hidden states), BasicUNetPlusPlus a list
    (its deep-supervision heads); training and serving want the first."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)[0]


def _vit(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    return FirstOutput(nets.ViT(in_channels=in_channels, spatial_dims=spatial_dims, classification=True,
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
    check_name(name, CLASSIFIERS, task="classification")
    try:
        return CLASSIFIERS[name](
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes, **dict(kwargs or {})
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"network {name!r} refused train.model_kwargs {kwargs}: {exc}") from exc


def memory_format(choice: str, network: nn.Module, *, dense: bool = False) -> torch.memory_format:
    """The layout ``network`` trains in (``train.memory_format``).

    auto: ``channels_last`` for a network that classifies or embeds 2D images (``dense`` False) and whose weights
    are mostly 2D convolutions: in that layout oneDNN runs DenseNet, ResNet and EfficientNet 1.05-1.31x as fast a
    training step and 1.14-1.52x a prediction on CPUs here (BENCHMARKS.md, "Training step: memory layouts"), as
    cuDNN does on tensor cores. Contiguous for the rest: a ViT (its weights are linear layers), 3D networks (no
    faster here) and networks with dense outputs (2D segmentation: 0.91x to 1.25x, network by network).
    ``channels_last`` asked for on a 3D network is ``channels_last_3d``.
    """
    if choice == "contiguous":
        return torch.contiguous_format
    convolutions = [m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    three_d = any(isinstance(m, nn.Conv3d) for m in convolutions)
    if choice == "channels_last":
        return torch.channels_last_3d if three_d else torch.channels_last
    weights = sum(p.numel() for p in network.parameters())
    in_2d = sum(p.numel() for m in convolutions if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    convolutional = not three_d and weights and in_2d > weights / 2
    return torch.channels_last if convolutional and not dense else torch.contiguous_format


def check_name(name: str, networks: dict[str, Callable[..., nn.Module]], *, task: str) -> None:
    """Refuse a network name the task does not know, with "did you mean ..."."""
    if name in networks:
        return
    other = SEGMENTERS if networks is CLASSIFIERS else CLASSIFIERS
    if name in other:
        raise ConfigError(f"network {name!r} is not a {task} network; choices: {', '.join(networks)}")
    hint = difflib.get_close_matches(name, list(networks), n=1)
    suggestion = f"did you mean {hint[0]!r}? " if hint else ""
    raise ConfigError(f"unknown network {name!r}; {suggestion}choices: {', '.join(networks)}")


def _dynunet_layout(patch: tuple[int, ...], depth: int = 4) -> dict[str, Any]:
    """nnU-Net's rule for DynUNet: halve each axis while it stays >= 8, at most ``depth`` times.

    MONAI's DynUNet takes the kernels and strides as given; the rule that derives them from the
    patch lives in nnU-Net's planners and MONAI's tutorials, not in a library call, hence this.
    """
    strides, sizes = [[1] * len(patch)], list(patch)
    for _ in range(depth):
        step = [2 if s >= 8 else 1 for s in sizes]
        if step == [1] * len(patch):
            break
        strides.append(step)
        sizes = [s // t for s, t in zip(sizes, step)]
    kernels = [[3] * len(patch) for _ in strides]
    return {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:]}


# CPU-sized defaults; UNETR and SwinUNETR keep MONAI's layout with narrower features.
SEGMENTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2), "num_res_units": 1},
    "attentionunet": {"channels": (16, 32, 64, 128), "strides": (2, 2, 2)},
    "segresnet": {"init_filters": 8, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1)},
    "unetr": {"feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 3},
    "swinunetr": {"feature_size": 12},
    "dynunet": {},
    "basicunetplusplus": {"features": (16, 16, 32, 64, 128, 16)},
}


def segmenter_kwargs(name: str, *, patch_size: tuple[int, ...], kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The constructor arguments a segmentation network is built with: defaults, what the patch implies
    (UNETR's image size, DynUNet's strides), then the config's."""
    chosen = dict(SEGMENTER_DEFAULTS.get(name, {}))
    if name == "unetr":
        chosen["img_size"] = list(patch_size)
    if name == "dynunet":
        chosen.update(_dynunet_layout(patch_size))
    return {**chosen, **dict(kwargs or {})}


def patch_divisor(name: str, kwargs: dict[str, Any]) -> int:
    """What every patch side must be a multiple of for the network to give back its input's size."""
    if name in ("unet", "attentionunet"):
        return math.prod(int(s) for s in kwargs.get("strides", (2, 2, 2)))
    if name == "segresnet":
        return 2 ** (len(kwargs.get("blocks_down", (1, 2, 2, 4))) - 1)
    if name == "unetr":
        return 16  # MONAI's UNETR cuts 16-voxel patches and upsamples by 16
    if name == "swinunetr":
        return 32  # patch embedding 2 then four merges of 2: 2**5
    if name == "basicunetplusplus":
        return 16
    return 1  # DynUNet: its strides are derived from the patch


# SwinUNETR's deepest stage is 1/32 of the patch and its InstanceNorm needs more than one voxel there
MIN_PATCH = {"swinunetr": 64}


def _seg(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def build(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
        return factory(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)

    return build


SEGMENTER_CLASSES: dict[str, type[nn.Module]] = {
    "unet": nets.UNet,
    "attentionunet": nets.AttentionUnet,
    "segresnet": nets.SegResNet,
    "unetr": nets.UNETR,
    "swinunetr": nets.SwinUNETR,
    "dynunet": nets.DynUNet,
    "basicunetplusplus": nets.BasicUNetPlusPlus,
}
SEGMENTERS: dict[str, Callable[..., nn.Module]] = {
    **{name: _seg(cls) for name, cls in SEGMENTER_CLASSES.items()},
    "basicunetplusplus": lambda **kw: FirstOutput(nets.BasicUNetPlusPlus(**kw)),
}


def check_segmenter_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse, before any data is read, ``train.model_kwargs`` the network's constructor has no parameter for
    (the rest is checked on a patch once the data's dimensions are known: :func:`build_segmenter`).

    Raises:
        ConfigError: naming the unknown argument(s), with the closest parameter.
    """
    parameters = inspect.signature(SEGMENTER_CLASSES[name]).parameters
    unknown = [k for k in kwargs if k not in parameters]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(parameters), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(f"network {name!r} has no argument {unknown[0]!r} (train.model_kwargs){suggestion}")


def build_segmenter(
    name: str, *, spatial_dims: int, in_channels: int, num_classes: int, patch_size: tuple[int, ...],
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A MONAI segmentation network, checked on a patch of zeros before any training.

    Args:
        name: one of :data:`SEGMENTERS`.
        spatial_dims: 2 or 3, the images' dimensions.
        in_channels: image channels.
        num_classes: output channels (background included).
        patch_size: the training and sliding-window patch.
        kwargs: the constructor arguments (see :func:`segmenter_kwargs`).

    Raises:
        ConfigError: unknown name, a network for other dimensions than the data's, a patch the network
            cannot take, or arguments the network refuses, each saying what to change.
    """
    check_name(name, SEGMENTERS, task="segmentation")
    kwargs = dict(kwargs or {})
    if len(patch_size) != spatial_dims:
        raise ConfigError(f"train.patch_size {list(patch_size)} has {len(patch_size)} sides but the images are "
                          f"{spatial_dims}D; give {spatial_dims} sides")
    given_dims = kwargs.pop("spatial_dims", spatial_dims)
    if given_dims != spatial_dims:
        raise ConfigError(f"train.model_kwargs.spatial_dims is {given_dims} but the images are {spatial_dims}D; "
                          "remove it (medflow takes the dimensions from the data)")
    divisor, least = patch_divisor(name, kwargs), MIN_PATCH.get(name, 1)
    if any(side % divisor or side < least for side in patch_size):
        fitted = [max(least, divisor, side // divisor * divisor) for side in patch_size]
        floor = f" and at least {least}" if least > 1 else ""
        raise ConfigError(f"{name} needs patch sides divisible by {divisor}{floor}; train.patch_size "
                          f"{list(patch_size)} is not: set train.patch_size={fitted}")
    try:
        network = SEGMENTERS[name](spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                                   **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"network {name!r} refused train.model_kwargs {kwargs}: {exc}") from exc
    probe = torch.zeros(1, in_channels, *patch_size)
    try:
        network.eval()
        with torch.no_grad():
            out = network(probe)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{name} cannot take a {'x'.join(map(str, patch_size))} patch "
                          f"({str(exc).splitlines()[0]}); change train.patch_size or train.model_kwargs") from exc
    finally:
        network.train()
    if tuple(out.shape) != (1, num_classes, *patch_size):
        raise ConfigError(f"{name} turns a {'x'.join(map(str, patch_size))} patch into {tuple(out.shape[2:])}; "
                          "choose train.patch_size sides its downsampling divides")
    return network
