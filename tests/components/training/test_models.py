from __future__ import annotations

import pytest
import torch

from components.errors import ConfigError
from components.training.models import (
    CLASSIFIERS, build_classifier, build_segmenter, classifier_kwargs, memory_format,
)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_each_network_builds_and_gives_one_logit_per_class(name):
    kwargs = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]} if name == "densenet" else {}
    kwargs = classifier_kwargs(name, image_size=64, kwargs=kwargs)
    net = build_classifier(name, spatial_dims=2, in_channels=1, num_classes=3, kwargs=kwargs).eval()
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 3)


def test_unknown_network_suggests_the_closest_name():
    with pytest.raises(ConfigError) as info:
        build_classifier("densnet121", spatial_dims=2, in_channels=1, num_classes=2)
    assert str(info.value) == (
        "unknown network 'densnet121'; did you mean 'densenet121'? "
        "choices: densenet, densenet121, resnet18, resnet50, efficientnet-b0, vit"
    )


def test_refused_keyword_arguments_are_a_config_error():
    with pytest.raises(ConfigError, match=r"network 'resnet18' refused train.model_kwargs \{'depth': 3\}"):
        build_classifier("resnet18", spatial_dims=2, in_channels=1, num_classes=2, kwargs={"depth": 3})


def test_a_vit_takes_its_image_size_from_the_data_and_refuses_a_patch_grid_that_does_not_fit():
    assert classifier_kwargs("vit", image_size=48, kwargs={"num_layers": 2}) == {
        "hidden_size": 192, "mlp_dim": 768, "num_layers": 2, "num_heads": 3, "img_size": 48, "patch_size": 12,
    }
    with pytest.raises(ConfigError) as info:
        classifier_kwargs("vit", image_size=50, kwargs={"patch_size": 16})
    assert str(info.value) == ("a ViT needs patches that tile the image: patch_size 16 does not divide data.image_size 50; "
                               "choose train.model_kwargs.patch_size among [2, 5, 10, 25]")


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_auto_trains_convolutional_classifiers_in_channels_last_with_the_same_logits(name):
    kwargs = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]} if name == "densenet" else {}
    kwargs = classifier_kwargs(name, image_size=64, kwargs=kwargs)
    torch.manual_seed(0)
    net = build_classifier(name, spatial_dims=2, in_channels=1, num_classes=3, kwargs=kwargs).eval()
    layout = memory_format("auto", net)
    assert layout is (torch.contiguous_format if name == "vit" else torch.channels_last)  # a ViT's weights are linear
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = net(images)
        net.to(memory_format=torch.channels_last)
        assert torch.allclose(net(images), expected, atol=1e-4)


def test_segmenters_and_volumes_stay_contiguous_unless_asked_and_volumes_then_take_the_3d_layout():
    kwargs = {"channels": [8, 16, 32], "strides": [2, 2]}
    flat = build_segmenter("unet", spatial_dims=2, in_channels=1, num_classes=2, patch_size=(32, 32), kwargs=kwargs)
    assert memory_format("auto", flat) is torch.channels_last  # its weights are 2D convolutions...
    assert memory_format("auto", flat, dense=True) is torch.contiguous_format  # ...but its output is a map
    unet = build_segmenter("unet", spatial_dims=3, in_channels=1, num_classes=2, patch_size=(32, 32, 16),
                           kwargs=kwargs)
    assert memory_format("auto", unet) is torch.contiguous_format
    assert memory_format("channels_last", unet) is torch.channels_last_3d
    assert memory_format("contiguous", build_classifier("densenet121", spatial_dims=2, in_channels=1,
                                                        num_classes=2)) is torch.contiguous_format
    volume = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        expected = unet.eval()(volume)
        assert torch.allclose(unet.to(memory_format=torch.channels_last_3d)(volume), expected, atol=1e-4)
