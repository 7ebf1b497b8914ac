"""mmfm: multimodal foundation models. Text, images and audio in; text, labels, embeddings out; one backbone.

The names below are imported on first use (PEP 562), so `import mmfm` and `mmfm --version` stay cheap; the model
code, and torch with it, load when a name that needs them is first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import mmfm.presets  # noqa: F401  (registers the built-in presets; imports no torch)
from mmfm.errors import CheckpointError, ConfigError, InputError, MMFMError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "ModelConfig": "mmfm.config",
    "create_model": "mmfm.loader",
    "load": "mmfm.loader",
    "MultimodalModel": "mmfm.model",
    "Classification": "mmfm.pipelines",
    "list_pretrained": "mmfm.pretrained",
    "list_configs": "mmfm.registry",
    "list_models": "mmfm.registry",
    "register_model": "mmfm.registry",
    "GenerationConfig": "mmfm.text_generation",
}

if TYPE_CHECKING:
    from mmfm.config import ModelConfig
    from mmfm.loader import create_model, load
    from mmfm.model import MultimodalModel
    from mmfm.pipelines import Classification
    from mmfm.pretrained import list_pretrained
    from mmfm.registry import list_configs, list_models, register_model
    from mmfm.text_generation import GenerationConfig


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    raise AttributeError(f"module 'mmfm' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CheckpointError",
    "Classification",
    "ConfigError",
    "GenerationConfig",
    "InputError",
    "MMFMError",
    "ModelConfig",
    "MultimodalModel",
    "create_model",
    "list_configs",
    "list_models",
    "list_pretrained",
    "load",
    "register_model",
]
