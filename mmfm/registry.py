"""Named models: presets (one short function per size, registered by name, as timm does) and shipped configs.

A shipped config is a YAML file in `configs/models/`, installed as package data `mmfm.configs`; its file name
without `.yaml` is its name ("mmfm-tiny-digits"). `get_config` resolves either kind of name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from mmfm.config import ModelConfig, clip, merge, quote, read_yaml_mapping
from mmfm.errors import ConfigError

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}
_CONFIGS_PACKAGE, _MODELS_FOLDER = "mmfm.configs", "models"


def register_model(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Registers a preset under its function name with underscores as dashes (`mmfm_tiny` -> "mmfm-tiny")."""
    _PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered presets (the built-in ones register when `mmfm` is imported)."""
    return sorted(_PRESETS)


def list_configs() -> list[str]:
    """Names of the shipped model configs (`configs/models/NAME.yaml`), usable wherever a preset name is."""
    folder = resources.files(_CONFIGS_PACKAGE) / _MODELS_FOLDER
    return sorted(f.name.removesuffix(".yaml") for f in folder.iterdir() if f.name.endswith(".yaml"))


def get_preset(name: str) -> ModelConfig:
    """The config of a registered preset; an unknown name lists close matches."""
    names = list_models()
    if not isinstance(name, str) or name not in _PRESETS:
        close = difflib.get_close_matches(clip(name, 100), names, n=3) if isinstance(name, str) else []
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {quote(name)}{hint} (registered: {', '.join(names)})")
    config = _PRESETS[name]()
    config.name = name
    return config


def get_config(name: str) -> ModelConfig:
    """The config of a preset (`list_models()`) or of a shipped config (`list_configs()`), presets first.

    Raises:
        ConfigError: a name that is neither, listing close matches of both kinds.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a model name must be non-empty text, got {quote(name)}")
    presets, configs = list_models(), list_configs()
    if name in presets:
        return get_preset(name)
    if name not in configs:
        close = difflib.get_close_matches(clip(name, 100), presets + configs, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown model {quote(name)}{hint} (presets: {', '.join(presets)}; shipped configs: {', '.join(configs)})"
        )
    resource = resources.files(_CONFIGS_PACKAGE) / _MODELS_FOLDER / f"{name}.yaml"
    with resources.as_file(resource) as path:  # a real file even when the package is zipped
        config = read_config(path)
    config.name = name
    return config


def read_config(path: str | Path) -> ModelConfig:
    """Reads a full config (as saved beside a checkpoint) or a recipe: a `preset:` key naming a preset or shipped
    config, plus overrides.

    File paths in it (`text.vocab`, `image_gen.vae_path`) are relative to the YAML file's folder, not to the
    working directory, so a saved checkpoint folder can be moved.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "config file")
    if "preset" in data:
        data = dict(data)
        preset = data.pop("preset")
        if not isinstance(preset, str) or not preset:
            raise ConfigError(
                f"{path}: 'preset' must name a preset or shipped config (e.g. mmfm-tiny), got {quote(preset)}"
            )
        data = merge(get_config(preset).to_dict(), data)
    config = ModelConfig.from_dict(data, str(path))

    def beside_file(p: str | None) -> str | None:
        return p if p is None or Path(p).is_absolute() else str((path.parent / p).absolute())

    config.text.vocab = beside_file(config.text.vocab)
    if config.image_gen is not None:
        config.image_gen.vae_path = beside_file(config.image_gen.vae_path)
    return config
