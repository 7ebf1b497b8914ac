"""Entry points: build a model from a preset or YAML, or load a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmfm.checkpoint import load_pretrained
from mmfm.config import ModelConfig
from mmfm.errors import CheckpointError, ConfigError
from mmfm.model import MultimodalModel
from mmfm.registry import get_preset


def create_model(name_or_path: str | Path, **overrides: Any) -> MultimodalModel:
    """A randomly initialised model from a registered preset name or a YAML config/recipe file.

    Args:
        name_or_path: a name from `mmfm.list_models()`, or the path of a `.yaml` file.
        **overrides: config fields to change, nested (`backbone={"depth": 2}`); dotted keys go through a
            dict: `create_model(name, **{"backbone.depth": 2})`.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        config = ModelConfig.from_file(path)
    else:
        config = get_preset(str(name_or_path))
    source = str(name_or_path)
    if overrides:
        source = f"{name_or_path} with overrides {overrides}"
        config = config.with_overrides(overrides, source=source)
    try:
        return MultimodalModel(config)
    except ConfigError as e:  # an encoder refused its settings: say which config they came from
        raise ConfigError(f"{source}: {e}") from e


def load(path: str | Path, strict: bool = True) -> MultimodalModel:
    """Loads a model saved with `save_pretrained` (a directory holding config.yaml + model.safetensors).

    Args:
        path: the checkpoint directory.
        strict: refuse missing or unexpected weights (mis-shaped weights are always refused).
    """
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    return load_pretrained(path, strict=strict)
