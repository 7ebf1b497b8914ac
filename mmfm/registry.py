"""Named model presets: one short function per size, registered by name (as timm does)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from mmfm.config import ModelConfig, merge, read_yaml_mapping
from mmfm.errors import ConfigError

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_model(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Registers a preset under its function name with underscores as dashes (`mmfm_tiny` -> "mmfm-tiny")."""
    _PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered presets (the built-in ones register when `mmfm` is imported)."""
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The config of a registered preset; an unknown name lists close matches."""
    names = list_models()
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint} (registered: {', '.join(names)})")
    config = _PRESETS[name]()
    config.name = name
    return config


def read_config(path: str | Path) -> ModelConfig:
    """Reads a full config (as saved beside a checkpoint) or a recipe (a `preset:` name plus overrides) from YAML.

    A relative `text.vocab` is relative to the YAML file's folder, not to the caller's working directory.
    """
    path = Path(path)
    data = read_yaml_mapping(path, "config file")
    if "preset" in data:
        data = dict(data)
        data = merge(get_preset(data.pop("preset")).to_dict(), data)
    config = ModelConfig.from_dict(data, str(path))
    vocab = config.text.vocab
    if vocab is not None and not Path(vocab).is_absolute():
        config.text.vocab = str((path.parent / vocab).absolute())
    return config
