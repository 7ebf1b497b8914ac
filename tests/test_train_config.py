"""Training recipes and `key=value` overrides from careless or hostile hands: numbers as people write them,
non-finite values, bad syntax and unreadable files are `ConfigError`s naming what was wrong."""

from __future__ import annotations

import math

import pytest

from mmfm.cli import main
from mmfm.errors import ConfigError
from mmfm.train import TrainConfig, parse_overrides

RECIPE = """\
model: mmfm-test
data: {train: train.jsonl}
tasks:
  - {name: image_caption, objective: caption, inputs: [image]}
steps: 4
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def test_the_readmes_override_example_is_a_number(recipe):
    config = TrainConfig.from_file(recipe, parse_overrides(["optim.lr=3e-4", "steps=1e3", "optim.eps=1E-6"]))
    assert (config.optim.lr, config.steps, config.optim.eps) == (3e-4, 1000, 1e-6)
    assert isinstance(config.steps, int)


def test_numbers_without_a_dot_in_a_recipe_file_are_numbers(recipe):
    recipe.write_text(RECIPE + "optim: {lr: 1e-3, betas: [0.9, 0.999], weight_decay: 5e-2}\n")
    config = TrainConfig.from_file(recipe)
    assert (config.optim.lr, config.optim.weight_decay) == (1e-3, 5e-2)
    assert math.isclose(config.optim.betas[1], 0.999)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.grad_clip=-.inf", "optim.grad_clip"),
        ("optim.betas=[0.9, .nan]", r"optim.betas\[1\]"),
        ("optim.lr=1.0e999", "optim.lr"),
    ],
)
def test_non_finite_numbers_are_refused_by_key(recipe, override, key):
    with pytest.raises(ConfigError, match=rf"recipe.yaml.*'{key}' must be a finite number"):
        TrainConfig.from_file(recipe, parse_overrides([override]))


@pytest.mark.parametrize(
    ("pair", "pattern"),
    [
        ("optim.lr=[", r"override 'optim.lr': not valid YAML"),
        ("optim.lr={a: ", r"override 'optim.lr': not valid YAML"),
        ("optim.lr=!!python/object:os.system x", r"override 'optim.lr': not valid YAML"),
        ("steps=1" + "0" * 5000, r"override 'steps': not valid YAML"),
        ("optim..lr=1", r"is not a dotted config key"),
        (".lr=1", r"is not a dotted config key"),
        ("optim lr=1", r"is not a dotted config key"),
        ("=1", r"is not KEY=VALUE"),
        ("steps", r"is not KEY=VALUE"),
        ("x=\udcff", r"override 'x': not valid YAML"),  # a non-UTF-8 argument, as Python decodes argv
        ("\udcff=1", r"is not a dotted config key"),
        ("x=&a [*a]", r"contains itself"),
    ],
)
def test_override_syntax_errors_are_config_errors_naming_the_override(pair, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        parse_overrides([pair])
    assert len(str(e.value)) < 600


def test_an_override_alias_bomb_is_refused_at_once():
    lists = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    lists += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="override 'model_overrides': .* too large"):
        parse_overrides([f"model_overrides=[{', '.join(lists)}]"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ({"optim.betas": [0.9]}, r"'optim.betas' must be a list of 2 values"),
        ({"optim.betas": [0.9, 1.5]}, r"optim.betas must be in \[0, 1\)"),
        ({"seed": 2**70}, r"'seed' is too large an integer"),
        ({"seed": 2**63 - 1}, r"seed must be an integer within"),
        ({"steps": 10**30}, r"'steps' is too large an integer"),
        ({"data.num_workers": -1}, r"data.num_workers must be >= 0"),
        ({"finetune.lora.dropout": 1.0}, r"finetune.lora needs"),
        ({"model_overrides": {1: 2}}, r"'model_overrides' must have text keys"),
    ],
)
def test_values_torch_would_choke_on_are_refused_by_key(recipe, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig.from_file(recipe, override)


def test_binary_and_folder_recipes_are_config_errors_naming_the_file(tmp_path):
    binary = tmp_path / "weights.pt"
    binary.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"weights.pt: the training config is not UTF-8 text"):
        TrainConfig.from_file(binary)
    with pytest.raises(ConfigError, match=r"the training config is a folder"):
        TrainConfig.from_file(tmp_path)


def test_an_over_long_model_name_in_a_recipe_is_no_os_error(recipe):
    recipe.write_text(RECIPE.replace("model: mmfm-test", "model: " + "m" * 5000))
    assert TrainConfig.from_file(recipe).model == "m" * 5000  # not a path: it names no file


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["optim.lr=.nan"], "'optim.lr' must be a finite number"),
        (["optim.lr=["], "override 'optim.lr': not valid YAML"),
        (["steps=abc"], "'steps' must be int"),
    ],
)
def test_the_cli_prints_one_error_line(recipe, capsys, overrides, pattern):
    assert main(["train", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmfm: error: ") and "Traceback" not in err
    assert pattern in err


def test_the_cli_names_a_binary_recipe(tmp_path, capsys):
    binary = tmp_path / "recipe.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert main(["train", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmfm: error: {binary}: the training config is not UTF-8 text")
