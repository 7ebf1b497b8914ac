"""Outside weights into mmfm: one pure key-remap function per source, found by name.

A converter reads a checkpoint in its own library's format (a file or a directory) and returns a
`Converted`: the mmfm config of what it describes and a state dict whose keys are `MultimodalModel`
keys (`encoders.audio.vit.blocks.0.attn.qkv.weight`, ...). It never builds a model and never touches
the network, so the same function serves `mmfm.load`, `mmfm convert SRC OUT/` and the parity tests.

```python
from mmfm.convert import register_converter, Converted

@register_converter("my_source")
def convert_my_source(path, **kwargs) -> Converted:
    state = read_state_dict(path)               # mmfm.convert.io: safetensors / weights_only torch.load
    return Converted({"audio": AudioEncoderConfig(...)}, {"encoders.audio." + k: v for k, v in ...})
```

`Converted.config` is either a whole `ModelConfig` or a partial one: a dict from `ModelConfig` field
names ("image", "audio", "text", "backbone", ...) to component configs (a dataclass replaces the
preset's component, a dict of fields is merged over it); `build_config` fills the rest from a preset.
Built-in converters live in the modules named in `_BUILTIN_MODULES` and are imported on first use, so
`import mmfm` does not pay for them.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mmfm.config import ModelConfig, merge
from mmfm.errors import CheckpointError, ConfigError
from mmfm.registry import get_config

__all__ = [
    "Converted",
    "build_config",
    "component_of",
    "convert",
    "get_converter",
    "list_sources",
    "register_converter",
    "source_for_hf_directory",
]

# Modules under mmfm.convert whose import registers the built-in converters (add a module here, not in the caller).
_BUILTIN_MODULES = ("ast", "timm", "open_clip", "hf_bert", "diffusers", "hf_llama", "gguf")

# A Hugging Face config.json is a few KB; a larger file is not read to find its model_type.
MAX_HF_CONFIG_BYTES = 16 * 1024**2

_CONVERTERS: dict[str, Callable[..., Converted]] = {}
_HF_MODEL_TYPES: dict[str, str] = {}  # config.json model_type -> source
_builtins_loaded = False


@dataclass
class Converted:
    """What a converter returns; unpacks as `config, state_dict = convert(...)`.

    Attributes:
        config: a whole `ModelConfig`, or a partial one: {ModelConfig field name: component config}.
        state_dict: tensors under `MultimodalModel.state_dict()` keys.
        tokenizer: a ready tokenizer the model takes instead of building the one `config.text` names (a GGUF
            file's, built from its metadata); None: built from the config.
        base: the config, or preset name, that completes a partial config when the caller names none (a language
            model's is text-only); None: the loader's default.
    """

    config: ModelConfig | dict[str, Any]
    state_dict: dict[str, Tensor]
    tokenizer: Any = None
    base: ModelConfig | str | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.config, self.state_dict))


def register_converter(
    source: str, hf_model_types: tuple[str, ...] = ()
) -> Callable[[Callable[..., Converted]], Callable[..., Converted]]:
    """Registers `fn(path, **kwargs) -> Converted` under `source` (the name `--from` and `convert` take).

    Args:
        source: the source's name, e.g. "ast".
        hf_model_types: Hugging Face `config.json` `model_type` values this converter reads, so that
            `mmfm.load` can convert a Hugging Face directory or hub snapshot without being told the source.
    """

    def decorator(fn: Callable[..., Converted]) -> Callable[..., Converted]:
        if source in _CONVERTERS and _CONVERTERS[source] is not fn:
            raise ValueError(f"a converter for source '{source}' is already registered ({_CONVERTERS[source]})")
        _CONVERTERS[source] = fn
        for model_type in hf_model_types:
            _HF_MODEL_TYPES[model_type] = source
        return fn

    return decorator


def source_for_hf_directory(directory: str | Path) -> str | None:
    """The registered source that reads this Hugging Face directory (by its config.json `model_type`), or None."""
    config = Path(directory) / "config.json"
    try:
        if not config.is_file() or config.stat().st_size > MAX_HF_CONFIG_BYTES:
            return None
        model_type = json.loads(config.read_bytes().decode("utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):  # ValueError: bad JSON or UTF-8
        return None
    if not isinstance(model_type, str):
        return None
    _load_builtins()
    return _HF_MODEL_TYPES.get(model_type)


def list_sources() -> list[str]:
    """Names of every registered source, sorted."""
    _load_builtins()
    return sorted(_CONVERTERS)


def get_converter(source: str) -> Callable[..., Converted]:
    """The converter registered under `source`; an unknown name raises `CheckpointError` listing the known ones."""
    _load_builtins()
    if source not in _CONVERTERS:
        raise CheckpointError(f"unknown conversion source '{source}' (known: {', '.join(sorted(_CONVERTERS))})")
    return _CONVERTERS[source]


def convert(source: str, path: str | Path, **kwargs: Any) -> Converted:
    """Reads the checkpoint at `path` (a file or directory in `source`'s format) as mmfm config + weights.

    Args:
        source: a name from `list_sources()`, e.g. "ast".
        path: the source checkpoint.
        **kwargs: passed to the converter (e.g. `model_name` where the file alone does not say the architecture).
    """
    try:
        exists = Path(path).exists()
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL character
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"{str(path)[:200]!r}: not a usable path to convert from '{source}' ({reason})") from None
    if not exists:
        raise CheckpointError(f"{path}: no such file or directory to convert from '{source}'")
    return get_converter(source)(path, **kwargs)


def build_config(config: ModelConfig | dict[str, Any], base: ModelConfig | str = "mmfm-base") -> ModelConfig:
    """A whole, validated `ModelConfig` from a converter's config and a base that supplies the rest.

    A whole `ModelConfig` is returned as it is. In a partial one, a component given as a dataclass replaces
    the base's component; one given as a dict of fields is merged over it (so the base's projector, say,
    survives a converted encoder's geometry); None removes it.

    Args:
        config: `Converted.config`.
        base: the config, or preset name, that supplies every component and field the converter did not.
    """
    if isinstance(config, ModelConfig):
        return config
    if isinstance(base, str):
        base = get_config(base)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ConfigError(f"converted config names unknown ModelConfig fields {unknown} (valid: {sorted(names)})")
    data = base.to_dict()
    for name, component in config.items():
        if dataclasses.is_dataclass(component):
            data[name] = dataclasses.asdict(component)
        elif isinstance(component, dict):
            data[name] = merge(data.get(name) or {}, component)
        else:
            data[name] = component
    return ModelConfig.from_dict(data, source=f"{base.name} with converted {', '.join(sorted(config))}")


def component_of(key: str) -> str:
    """The model component a state-dict key belongs to: "encoders.audio.vit.cls_token" -> "encoders.audio"."""
    parts = key.split(".")
    if parts[:2] == ["heads", "contrastive"]:
        # Dual-tower weights bring the temperature but not the projections of modalities embedded by the backbone.
        return ".".join(parts[:4] if parts[2] == "proj" else parts[:3])
    return parts[0] if parts[0] in ("backbone", "token_embedding") else ".".join(parts[:2])


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(f"mmfm.convert.{name}")
