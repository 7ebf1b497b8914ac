"""Configs round-trip YAML, and every bad key, type or combination names itself and its file."""

from pathlib import Path

import pytest
import yaml

import mmfm
from mmfm.errors import ConfigError
from mmfm.registry import get_preset, read_config

CONFIG_DIR = Path(mmfm.__file__).parent.parent / "configs" / "models"


@pytest.mark.parametrize("name", mmfm.list_models())
def test_every_preset_round_trips_through_yaml(tmp_path, name):
    config = get_preset(name)
    config.save(tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml") == config


def test_recipe_overrides_only_the_fields_it_names(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("preset: mmfm-tiny\nbackbone:\n  depth: 2\naudio: null\n")
    config = read_config(path)
    base = get_preset("mmfm-tiny")
    assert config.backbone.depth == 2 and config.audio is None
    assert config.backbone.dim == base.backbone.dim and config.image == base.image


def test_unknown_key_names_the_key_the_file_and_a_close_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: mmfm-test\nbackbone:\n  num_haeds: 4\n")
    with pytest.raises(ConfigError) as e:
        read_config(path)
    message = str(e.value)
    assert str(path) in message and "backbone.num_haeds" in message and "backbone.num_heads" in message


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: mmfm-test\ntext:\n  max_length: long\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'text.max_length' must be int"):
        read_config(path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"backbone.num_heads": 3}, "num_heads .* must divide backbone.dim"),
        ({"backbone.num_kv_heads": 3}, "num_kv_heads .* must divide backbone.num_heads"),
        ({"text.tokenizer": "sentencepiece"}, r"'text.tokenizer' must be one of"),
        ({"classify.labels": []}, "classify.labels must name at least one class"),
        ({"audio.patch_stride": 0}, "audio.patch_stride"),
        ({"backbone.max_seq_len": 40}, "max_seq_len"),
    ],
)
def test_impossible_combinations_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        mmfm.create_model("mmfm-test", **override)


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean mmfm-tiny"):
        mmfm.create_model("mmfm-tin")


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("backbone: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        read_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_is_a_valid_config(path):
    config = read_config(path)
    assert yaml.safe_load(yaml.safe_dump(config.to_dict())) == config.to_dict()


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_builds_a_model(path):
    model = mmfm.create_model(path)
    config = read_config(path)
    assert set(model.encoders) == set(config.modalities) - {"text"}  # text enters through model.token_embedding


def test_settings_an_encoder_refuses_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("preset: mmfm-test\nimage:\n  model_name: resnet18\n")
    with pytest.raises(ConfigError, match=r"odd.yaml: image.model_name: 'resnet18' is not a timm ViT-family model"):
        mmfm.create_model(path)
