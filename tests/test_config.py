"""Configs round-trip YAML, and every bad key, type or combination names itself and its file."""

from pathlib import Path

import pytest
import torch
import yaml

import mmfm
from mmfm.errors import ConfigError
from mmfm.registry import get_config, get_preset, read_config

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


def test_list_configs_names_every_shipped_model_yaml_and_no_preset():
    assert mmfm.list_configs() == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert not set(mmfm.list_configs()) & set(mmfm.list_models())


@pytest.mark.parametrize("name", mmfm.list_configs())
def test_a_shipped_config_by_name_is_its_yaml_file_from_any_working_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # read from the installed package, not from a path relative to the repository
    config = get_config(name)
    assert config.name == name
    assert config == read_config(CONFIG_DIR / f"{name}.yaml").with_overrides({"name": name})


def test_a_model_by_config_name_equals_the_model_of_its_yaml_path():
    torch.manual_seed(0)
    by_name = mmfm.create_model("mmfm-tiny-digits")
    torch.manual_seed(0)
    by_path = mmfm.create_model(CONFIG_DIR / "mmfm-tiny-digits.yaml")
    assert by_name.config.classify.labels == [str(d) for d in range(10)]
    assert by_name.state_dict().keys() == by_path.state_dict().keys()
    for key, value in by_name.state_dict().items():
        assert torch.equal(value, by_path.state_dict()[key]), key


def test_a_recipe_can_name_a_shipped_config_as_its_preset(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("preset: mmfm-tiny-digits-gen\nbackbone:\n  depth: 1\n")
    config = read_config(path)
    base = get_config("mmfm-tiny-digits-gen")  # itself `preset: mmfm-tiny` plus overrides
    assert config.backbone.depth == 1 and config.backbone.dim == base.backbone.dim
    assert config.image_gen == base.image_gen and config.image.patch_size == 8
    assert config.name == "mmfm-tiny-digits-gen"


def test_an_unknown_name_lists_close_presets_and_shipped_configs():
    with pytest.raises(ConfigError) as e:
        get_config("mmfm-tiny-digit")
    message = str(e.value)
    assert "did you mean mmfm-tiny-digits, mmfm-tiny-digits-gen, mmfm-tiny?" in message
    assert "presets: mmfm-base" in message and "shipped configs: mmfm-base-gqa" in message
    with pytest.raises(ConfigError, match=r"unknown model 'mmfm-gqa'; did you mean mmfm-base-gqa"):
        get_config("mmfm-gqa")


def test_relative_file_paths_in_a_yaml_are_relative_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "latent.yaml"
    path.write_text("preset: mmfm-test\nimage_gen: {space: latent, vae_path: ../vaes/mine, image_size: 16}\n")
    monkeypatch.chdir(tmp_path)
    config = read_config("models/latent.yaml")
    assert Path(config.image_gen.vae_path).is_absolute()
    assert Path(config.image_gen.vae_path).resolve() == (tmp_path / "vaes" / "mine").resolve()
    path.write_text(f"preset: mmfm-test\nimage_gen: {{space: latent, vae_path: {tmp_path}/abs, image_size: 16}}\n")
    assert read_config(path).image_gen.vae_path == f"{tmp_path}/abs"
