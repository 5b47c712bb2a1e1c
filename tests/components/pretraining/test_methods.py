"""The methods' parts: the network is built once, from the random stream as the caller left it, and the
held-out pass gives the loss's input and one view's features as separate passes would."""

from __future__ import annotations

import pytest
import torch

from components.config import load_config
from components.pretraining.methods import ENCODER_CLASSES, build_method
from components.training.encoders import build_mae_encoder, mae_kwargs
from components.training.models import build_classifier, classifier_kwargs
from components.training.preprocess import PreprocessSpec
from components.training.pretrained import strip_head

SPEC = PreprocessSpec(spatial_size=(32, 32), mean=0.0, std=1.0)
METHODS = [(["pretrain.method=simclr", "pretrain.model=densenet"]),
           (["pretrain.method=mae", "pretrain.model=vit", "pretrain.model_kwargs={patch_size: 8}"])]


def _config(overrides: list[str]):
    return load_config(overrides=["data.image_size=32", "train.device=cpu", *overrides], environ={})


def _expected_encoder(config) -> torch.nn.Module:
    """The encoder built directly, as a bare loop builds it."""
    cfg = config.pretrain
    kwargs = classifier_kwargs(cfg.model, image_size=32, kwargs=cfg.model_kwargs)
    if cfg.method == "mae":
        return build_mae_encoder(mae_kwargs(kwargs, masking_ratio=cfg.mask_ratio))
    network = build_classifier(cfg.model, spatial_dims=2, in_channels=1, num_classes=ENCODER_CLASSES, kwargs=kwargs)
    return strip_head(network, ENCODER_CLASSES)[0]


@pytest.mark.parametrize("overrides", METHODS)
def test_the_network_is_built_once_from_the_callers_random_stream(overrides):
    config = _config(overrides)
    torch.manual_seed(3)
    expected = _expected_encoder(config).state_dict()
    torch.manual_seed(3)
    encoder = build_method(config, lambda: SPEC).encoder
    state = encoder.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("overrides", METHODS)
def test_the_held_out_pass_gives_the_loss_input_and_the_first_views_features(overrides):
    config = _config(overrides)
    torch.manual_seed(0)
    parts = build_method(config, lambda: SPEC)
    network = parts.network.eval()
    channels = 2 if config.pretrain.method == "simclr" else 1
    images = torch.randn(4, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(5)  # MAE's hidden patches
        output, features = parts.held_out(network, images)
        torch.manual_seed(5)
        expected_output = network(images)
        expected_features = parts.encoder(images[:, :1]).flatten(1)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    assert features.shape == (4, parts.description["feature_dim"])
    torch.testing.assert_close(features, expected_features, rtol=1e-5, atol=1e-5)
