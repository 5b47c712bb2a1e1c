from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from components.config import RunConfig, default_config_path, load_config
from components.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_packaged_demo_config_loads_and_matches_the_repository_copy():
    config = load_config(environ={})
    assert config.data.name == "demo"
    assert config.promotion.rules, "the demo promotes through gates"
    assert filecmp.cmp(default_config_path(), REPO / "configs" / "demo-classification.yaml", shallow=False)


@pytest.mark.parametrize(
    ("override", "section", "field", "expected"),
    [
        ("train.epochs=2", "train", "epochs", 2),
        ("data.bias=0.8", "data", "bias", 0.8),
        ("train.model_kwargs.init_features=8", "train", "model_kwargs", {"init_features": 8, "growth_rate": 16, "block_config": [2, 4, 4]}),
        ("evaluate.threshold=0.3", "evaluate", "threshold", 0.3),
    ],
)
def test_set_overrides_parse_yaml_values(override, section, field, expected):
    config = load_config(overrides=[override], environ={})
    assert getattr(getattr(config, section), field) == expected


def test_environment_overrides_apply_before_set():
    config = load_config(overrides=["train.lr=0.5"], environ={"MEDFLOW__TRAIN__EPOCHS": "4", "MEDFLOW__TRAIN__LR": "0.1"})
    assert (config.train.epochs, config.train.lr) == (4, 0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=2", "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
        ("trian.epochs=2", "unknown config key 'trian.epochs'; did you mean 'train'?"),
        ("nothing=1", "unknown config key 'nothing'"),
        ("train.epochs", "override 'train.epochs' is not of the form key.path=value"),
        ("train.epochs.x=1", "override 'train.epochs.x=1': train.epochs is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override], environ={})
    assert str(info.value) == message


def test_invalid_value_names_the_field():
    with pytest.raises(ConfigError, match=r"data\.bias: Input should be less than or equal to 1"):
        load_config(overrides=["data.bias=1.5"], environ={})


def test_an_unknown_memory_format_lists_the_choices():
    with pytest.raises(ConfigError, match=r"train\.memory_format: Input should be 'auto', 'channels_last' or "
                                          r"'contiguous'"):
        load_config(overrides=["train.memory_format=channels_first"], environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  epochz: 3\n", "unknown config key 'train.epochz'; did you mean 'train.epochs'?"),
        ("data:\n  splits:\n    tset: 0.2\n", "unknown config key 'data.splits.tset'; did you mean 'data.splits.test'?"),
        ("trian:\n  epochs: 3\n", "unknown config key 'trian'; did you mean 'train'?"),
    ],
)
def test_unknown_key_in_file_is_refused_with_the_closest(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: {message}"


def test_a_bad_value_blames_the_override_or_variable_that_set_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.epochs=abc"], environ={})
    assert str(info.value).startswith("override 'train.epochs=abc': train.epochs: Input should be a valid integer")
    with pytest.raises(ConfigError) as info:
        load_config(environ={"MEDFLOW__TRAIN__EPOCHS": "abc"})
    assert str(info.value).startswith("MEDFLOW__TRAIN__EPOCHS=abc: train.epochs: Input should be a valid integer")
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: train.epochs: Input should be a valid integer")


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  name: demo\ntrain:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (f"{path} is not valid YAML (line 5, column 1): expected ',' or ']', but got "
                               "'<stream end>' (while parsing a flow sequence from line 4, column 11)")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config .*missing.yaml"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_config(bad, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match=r"expected a mapping of sections, got int"):
        load_config(scalar, environ={})


def test_unknown_gate_operator_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=['promotion.rules=[{"metric": "overall.auc", "op": "=>", "value": 0.8}]'], environ={})
    assert str(info.value).endswith("promotion.rules.0.op: Input should be '>=', '>', '<=' or '<'")


def test_defaults_validate_without_a_file():
    assert RunConfig().train.epochs >= 1


def test_config_hash_follows_content():
    a, b = load_config(environ={}), load_config(environ={})
    c = load_config(overrides=["train.epochs=1"], environ={})
    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize(("source", "registered"), [
    ("models:/chest-classifier@champion", True), ("models:/chest-classifier/3", True),
    ("checkpoints/models/encoder.pt", False), ("/opt/weights/rad-dino", False),
])
def test_a_backbone_in_the_registry_is_told_from_a_file(source, registered):
    cfg = load_config(None, overrides=[f"train.backbone={{source: {source}}}"])
    assert cfg.train.backbone.registered is registered
