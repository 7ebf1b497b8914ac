"""Named model presets: one short function per size, registered by name (as timm does)."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from mmfm.config import ModelConfig
from mmfm.errors import ConfigError

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_model(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Registers a preset under its function name with underscores as dashes (`mmfm_tiny` -> "mmfm-tiny")."""
    _PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered presets."""
    import mmfm.presets  # noqa: F401  (registers the built-in presets)

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
