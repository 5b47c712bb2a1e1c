from __future__ import annotations

import pytest
import torch

from components.errors import ConfigError
from components.training.models import CLASSIFIERS, build_classifier, classifier_kwargs


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
