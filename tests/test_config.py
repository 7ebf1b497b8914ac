"""Configs round-trip YAML, and every bad key, type or combination names itself and its file."""

import contextlib
import os
import re
import threading
import time
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
    assert "did you mean mmfm-tiny-digits, mmfm-tiny-digits-gen, mmfm-tiny-digits-towers?" in message
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


# Hostile and careless config files (issue 11): bounded cost, short messages, errors that name the file and key.


def alias_bomb(levels: int) -> str:
    """A YAML flow list whose last item stands for 10**levels copies of "x", in well under 1 KB."""
    lists = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    lists += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"[{', '.join(lists)}]"


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file_and_the_limit(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(f"preset: mmfm-test\nx: {alias_bomb(9)}\n")  # 10**9 strings once expanded
    assert path.stat().st_size < 1024
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        read_config(path)
    assert time.perf_counter() - start < 2.0
    message = str(e.value)
    assert str(path) in message and re.search(r"'x\[\d\]' is too large", message) and "MAX_CONFIG_SIZE" in message
    assert len(message) < 1000


def test_a_value_that_does_not_fit_is_quoted_short(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(f"preset: mmfm-test\nbackbone:\n  depth: {alias_bomb(6)}\n")  # a million strings, under the limit
    with pytest.raises(ConfigError, match=r"big.yaml: 'backbone.depth' must be int") as e:
        read_config(path)
    assert len(str(e.value)) < 1000
    with pytest.raises(ConfigError, match="'text.max_length' must be int") as e:
        get_preset("mmfm-test").with_overrides({"text": {"max_length": "9" * 10**6}})  # a 1 MB text
    assert len(str(e.value)) < 1000


def test_the_config_size_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "labels.yaml"
    path.write_text("preset: mmfm-test\nclassify:\n  labels: [" + ", ".join(f"c{i}" for i in range(300)) + "]\n")
    assert len(read_config(path).classify.labels) == 300
    monkeypatch.setattr(mmfm.config, "MAX_CONFIG_SIZE", 500)
    with pytest.raises(ConfigError, match=r"labels.yaml: 'classify.labels' is too large"):
        read_config(path)
    monkeypatch.setattr(mmfm.config, "MAX_CONFIG_BYTES", 100)
    with pytest.raises(ConfigError, match=r"labels.yaml: the config file is over 100 bytes.*MAX_CONFIG_BYTES"):
        read_config(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("a: &a [1, *a]\n", r"'a\[1\]' contains itself"),
        ("x: " + "[" * 80 + "]" * 80 + "\n", "nests more than 64 levels"),
        ("steps: 1" + "0" * 5000 + "\n", "not valid YAML"),
        ("when: 2001-13-45\n", "not valid YAML"),
    ],
)
def test_yaml_that_cannot_be_a_config_is_a_config_error(tmp_path, text, pattern):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as e:
        mmfm.config.read_yaml_mapping(path, "config file")
    assert str(path) in str(e.value)


def test_text_with_lone_surrogates_is_refused_by_key():
    # libyaml refuses "\ud800" in a file; a Python caller can still hand one in
    for overrides, key in [
        ({"name": "a\udcff"}, "name"),
        ({"classify.labels": ["cat", "\ud800"]}, r"classify.labels\[1\]"),
    ]:
        with pytest.raises(ConfigError, match=rf"'{key}' holds a lone surrogate"):
            get_preset("mmfm-test").with_overrides(overrides)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("backbone", "rope_theta", ".nan"),
        ("backbone", "norm_eps", ".nan"),
        ("backbone", "rope_theta", ".inf"),
        ("contrastive", "init_temperature", "-.inf"),
        ("audio", "norm_std", ".nan"),
        ("image_gen", "beta_end", ".nan"),
    ],
)
def test_non_finite_numbers_are_refused_by_key(tmp_path, section, key, value):
    path = tmp_path / "nan.yaml"
    extra = "  space: pixel\n" if section == "image_gen" else ""
    path.write_text(f"preset: mmfm-test\n{section}:\n{extra}  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"nan.yaml: '{section}.{key}' must be a finite number"):
        read_config(path)


def test_numbers_are_numbers_as_people_write_them(tmp_path):
    path = tmp_path / "sci.yaml"
    # YAML 1.1 reads 1e4 and 1e-6 (no dot) as text; they are numbers where a number belongs
    path.write_text("preset: mmfm-test\nbackbone:\n  rope_theta: 1e4\n  norm_eps: 1e-6\n  depth: 2e0\n")
    config = read_config(path)
    assert (config.backbone.rope_theta, config.backbone.norm_eps, config.backbone.depth) == (1e4, 1e-6, 2)
    assert isinstance(config.backbone.depth, int)
    # ... and text stays text where text belongs, through a save and a load
    labeled = get_preset("mmfm-test").with_overrides({"classify": {"labels": ["1e5", "2e-3", "0.5"]}})
    labeled.save(tmp_path / "config.yaml")
    assert read_config(tmp_path / "config.yaml").classify.labels == ["1e5", "2e-3", "0.5"]
    with pytest.raises(ConfigError, match="'backbone.depth' must be int"):
        get_preset("mmfm-test").with_overrides({"backbone.depth": "2.5"})


@pytest.mark.parametrize("preset", ["null", "[mmfm-test]", "''", "{a: 1}", "3"])
def test_a_preset_that_is_not_a_name_is_a_config_error(tmp_path, preset):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"preset: {preset}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: 'preset' must name a preset"):
        read_config(path)
    with pytest.raises(ConfigError, match="model name must be non-empty text"):
        get_config(yaml.safe_load(preset) or "")


def test_binary_non_utf8_folder_and_device_config_files_are_config_errors(tmp_path):
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xff\xfe")
    with pytest.raises(ConfigError, match=r"model.safetensors: the config file is not UTF-8 text"):
        read_config(binary)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"preset: mmfm-test\x00\n")
    with pytest.raises(ConfigError, match=r"nul.yaml: not valid YAML"):
        read_config(nul)
    with pytest.raises(ConfigError, match=rf"{tmp_path}: the config file is a folder"):
        read_config(tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(ConfigError, match="/dev/null: the config file is not a regular file"):
            read_config("/dev/null")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        read_config(tmp_path / ("x" * 5000 + ".yaml"))


def test_a_fifo_config_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():  # a reader that blocks on the FIFO gets EOF after 5 s instead of hanging the suite
        if not done.wait(5):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match="config.yaml: the config file is not a regular file"):
            read_config(fifo)
    finally:
        done.set()


def test_settings_out_of_range_name_their_key():
    cases = {
        "backbone.num_kv_heads": 0,
        "backbone.rope_theta": -1.0,
        "backbone.norm_eps": 0.0,
        "audio.norm_std": 0.0,
        "audio.frame_shift_ms": 0.0,
        "image.in_chans": 2,
        "image.std": [0.5, 0.0, 0.5],
        "image.mean": [0.5, 0.5],
    }
    for key, value in cases.items():
        with pytest.raises(ConfigError, match=rf"{key}"):
            get_preset("mmfm-test").with_overrides({key: value})


def test_overrides_with_conflicting_or_odd_keys_are_config_errors():
    from mmfm.config import nest_dotted

    assert nest_dotted({"backbone.depth": 2, "backbone": {"dim": 64}}) == {"backbone": {"depth": 2, "dim": 64}}
    for overrides, pattern in [
        ({"backbone.depth": 2, "backbone": None}, "replaces a section"),
        ({"backbone..depth": 2}, "empty part"),
        ({1: 2}, "must be text"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            get_preset("mmfm-test").with_overrides(overrides)
