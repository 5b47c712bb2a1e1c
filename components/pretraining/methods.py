"""The self-supervised methods, declared once: what each trains (the network the epoch loop fits, its loss,
its views) and what it leaves (the encoder, its description and weights). ``pretrain.method`` names one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from monai.transforms import Compose
from torch import nn

from components.config import BackboneConfig, RunConfig
from components.errors import ConfigError
from components.pretraining.mae import MaskedReconstruction, reconstruction_loss
from components.pretraining.simclr import TwoViews, contrastive_loss
from components.pretraining.views import view_transforms
from components.training.backbones import Backbone, load_backbone
from components.training.pretrained import FORMAT_MONAI, strip_head
from components.training.encoders import FORMAT_MAE, build_mae_encoder, mae_kwargs
from components.training.models import CLASSIFIERS, build_classifier, check_name, classifier_kwargs
from components.training.preprocess import PreprocessSpec

# a classifier is built with this many outputs and its head removed: the encoder does not depend on it
ENCODER_CLASSES = 2


@dataclass
class MethodParts:
    """What a method brings to the epoch loop.

    Attributes:
        network: trained by the loop; ``network(images)`` is what ``loss`` takes.
        loss: ``loss(output, labels)`` (labels unused).
        transforms: makes the dictionary transforms from a path to the images ``network`` takes.
        encoder: the encoder inside ``network``: images (B, C, H, W) -> features (B, D).
        held_out: ``held_out(network, images)`` -> what ``loss`` takes and the features (B, D) of one view of a
            batch's images, from one pass where the method's own pass runs the encoder over that view unmasked.
        description: how :func:`components.training.backbones.build_encoder` rebuilds the encoder.
        export: the encoder's state_dict from the network's.
        spec: the preprocessing the encoder takes: the data's, or a continued backbone's own.
        tags: ``medflow.backbone.*`` lineage of a continued backbone (else none).
    """

    network: nn.Module
    loss: Callable[..., torch.Tensor]
    transforms: Callable[[], Compose]
    encoder: nn.Module
    held_out: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    description: dict
    export: Callable[[dict], dict]
    spec: PreprocessSpec
    tags: dict[str, str] = field(default_factory=dict)


def _submodule_state(prefix: str) -> Callable[[dict], dict]:
    return lambda state: {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


CONTINUED = "continued"  # the regime tag of a backbone pretraining continues


def source_view(config: RunConfig) -> RunConfig:
    """The config that loads ``pretrain.source`` as a backbone (``train.backbone`` with ``pretrain.model``, whose
    state_dict a MONAI file holds), for :func:`components.training.backbones.load_backbone`."""
    cfg = config.pretrain
    backbone = BackboneConfig(source=cfg.source, regime="finetune")
    train = config.train.model_copy(update={"model": cfg.model, "model_kwargs": cfg.model_kwargs, "backbone": backbone})
    return config.model_copy(update={"train": train})


def load_source(config: RunConfig, data_spec: Callable[[], PreprocessSpec] | None = None) -> Backbone:
    """The backbone ``pretrain.source`` names, its weights loaded (refused in one line as a training's would be)."""
    try:
        return load_backbone(source_view(config), data_spec=data_spec)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("train.backbone.source", "pretrain.source")) from exc


def describe_encoder(config: RunConfig) -> dict:
    """The encoder ``pretrain`` describes, checked before any data is read: a classifier network without its
    head (SimCLR), a backbone source's encoder (SimCLR continuing it), or MONAI's masked autoencoder ViT (MAE).

    Raises:
        ConfigError: an unknown network or source, one the method cannot train, arguments the network refuses.
    """
    if config.pretrain.source is not None:
        _check_continued(config)
        loaded = load_source(config)
        return {**loaded.description, "feature_dim": loaded.feature_dim}
    return _built_encoder(config)[0]


def _check_continued(config: RunConfig) -> None:
    if config.pretrain.method != "simclr":
        raise ConfigError(f"pretrain.source continues a backbone with SimCLR; pretrain.method {config.pretrain.method} "
                          "starts its network from random weights: remove pretrain.source, or set "
                          "pretrain.method=simclr")


def _built_encoder(config: RunConfig) -> tuple[dict, nn.Module]:
    """:func:`describe_encoder`'s description of a network from random weights, and the encoder it built for it
    (MONAI's MAE ViT, or the classifier with its head stripped), which :func:`build_method` trains."""
    cfg = config.pretrain
    check_name(cfg.model, CLASSIFIERS, task="pretrain")
    kwargs = classifier_kwargs(cfg.model, image_size=config.data.image_size, kwargs=cfg.model_kwargs)
    if cfg.method == "mae":
        if cfg.model != "vit":
            raise ConfigError(f"pretrain.method mae hides patches of a vision transformer; pretrain.model "
                              f"{cfg.model!r} is a CNN: set pretrain.model=vit, or pretrain.method=simclr")
        full = mae_kwargs(kwargs, masking_ratio=cfg.mask_ratio)
        try:
            encoder = build_mae_encoder(full)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"MONAI's MaskedAutoEncoderViT refused pretrain.model_kwargs {cfg.model_kwargs}: "
                              f"{exc}") from exc
        return {"format": FORMAT_MAE, "network": "vit", "network_kwargs": full,
                "feature_dim": int(encoder.blocks[-1].normalized_shape[0])}, encoder
    network = build_classifier(cfg.model, spatial_dims=2, in_channels=1, num_classes=ENCODER_CLASSES, kwargs=kwargs)
    encoder, feature_dim, head = strip_head(network, ENCODER_CLASSES)
    return {"format": FORMAT_MONAI, "network": cfg.model, "num_classes": ENCODER_CLASSES, "network_kwargs": kwargs,
            "feature_dim": feature_dim, "head": head}, encoder


def _simclr_held_out(network: TwoViews, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features, projections = network.embed(images)
    return projections, features[: len(images)]


def _mae_held_out(network: MaskedReconstruction, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the reconstruction's pass sees the visible patches only: the features are a pass of their own
    return network(images), network.encoder(images).flatten(1)


def build_method(config: RunConfig, data_spec: Callable[[], PreprocessSpec]) -> MethodParts:
    """The parts of ``pretrain.method`` for ``pretrain.model`` or ``pretrain.source`` (see
    :func:`describe_encoder`); ``data_spec`` makes the data's preprocessing (a Hugging Face source has its own).
    The network is built once, from the random stream as the caller left it."""
    cfg = config.pretrain
    if cfg.source is not None:
        _check_continued(config)
        loaded = load_source(config, data_spec)
        encoder = loaded.encoder.train()
        for parameter in encoder.parameters():
            parameter.requires_grad_(True)
        return MethodParts(network=TwoViews(encoder, loaded.feature_dim, cfg.projection_dim),
                           loss=contrastive_loss(cfg.temperature), transforms=lambda: view_transforms(loaded.spec, cfg),
                           encoder=encoder, held_out=_simclr_held_out,
                           description={**loaded.description, "feature_dim": loaded.feature_dim},
                           export=_submodule_state("encoder."), spec=loaded.spec, tags=loaded.tags(CONTINUED))
    spec = data_spec()
    description, encoder = _built_encoder(config)
    if cfg.method == "mae":
        return MethodParts(network=MaskedReconstruction(encoder), loss=reconstruction_loss,
                           transforms=lambda: view_transforms(spec, cfg, views=1), encoder=encoder,
                           held_out=_mae_held_out, description=description,
                           export=_submodule_state("encoder."), spec=spec)
    return MethodParts(network=TwoViews(encoder, description["feature_dim"], cfg.projection_dim),
                       loss=contrastive_loss(cfg.temperature), transforms=lambda: view_transforms(spec, cfg),
                       encoder=encoder, held_out=_simclr_held_out,
                       description=description, export=_submodule_state("encoder."), spec=spec)
