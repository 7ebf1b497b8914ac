"""mmfm: multimodal foundation models. Text, images and audio in; text, labels, embeddings out; one backbone."""

import mmfm.presets  # noqa: F401  (registers the built-in presets)
from mmfm.config import ModelConfig
from mmfm.errors import CheckpointError, ConfigError, InputError, MMFMError
from mmfm.loader import create_model, load
from mmfm.model import MultimodalModel
from mmfm.pipelines import Classification
from mmfm.pretrained import list_pretrained
from mmfm.registry import list_configs, list_models, register_model
from mmfm.text_generation import GenerationConfig

__version__ = "0.1.0"

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
