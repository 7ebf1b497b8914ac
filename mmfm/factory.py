"""Entry points: build a model from a preset or YAML, or load a saved one."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from mmfm.checkpoint import CONFIG_NAME, load_pretrained, load_state
from mmfm.config import ModelConfig
from mmfm.errors import CheckpointError, ConfigError
from mmfm.model import MultimodalModel
from mmfm.registry import get_preset

# The preset that supplies what converted weights (one tower, say) do not bring, unless a tag or caller says.
DEFAULT_BASE = "mmfm-base"


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


def load(path: str | Path, strict: bool = True, base: str | ModelConfig | None = None) -> MultimodalModel:
    """Loads a pretrained model from a directory, a weights file, a pretrained tag or a Hugging Face hub id.

    Args:
        path: one of, tried in this order:
            - a directory written by `save_pretrained` (config.yaml + model.safetensors, or shards), or a Hugging
              Face directory whose config.json `model_type` a converter reads (an AST model, say);
            - a weights file of an mmfm model with its config.yaml beside it: `.safetensors` (memory-mapped), or
              `.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)`;
            - a tag from `mmfm.list_pretrained()`: fetched, checked against its sha256, converted;
            - a hub id "org/name": `huggingface_hub.snapshot_download` (only its cache with HF_HUB_OFFLINE=1),
              then read as a directory.
        strict: refuse missing or unexpected weights (mis-shaped weights are always refused). For weights
            converted from another library, "missing" means missing from the components they bring.
        base: for converted weights, the preset name or config that supplies the other components (they are
            freshly initialised, with a warning); default: the tag's base, else "mmfm-base".

    Raises:
        CheckpointError: naming the input and what was wrong with it.
    """
    from mmfm.pretrained import HUB_ID, download_hub, fetch, get_pretrained, is_pretrained_tag

    spec = str(path)
    if Path(path).exists():
        return _load_local(Path(path), strict, base)
    if is_pretrained_tag(spec):
        entry = get_pretrained(spec)
        return _load_local(fetch(entry), strict, base or entry.base, entry.source, entry.convert_kwargs)
    if HUB_ID.match(spec):
        return _load_local(download_hub(spec), strict, base)
    raise CheckpointError(
        f"{path}: no such checkpoint directory or file, nor a pretrained tag (see mmfm.list_pretrained()) "
        "or a hub id ('org/name')"
    )


def _load_local(
    location: Path,
    strict: bool,
    base: str | ModelConfig | None,
    source: str | None = None,
    convert_kwargs: dict[str, Any] | None = None,
) -> MultimodalModel:
    """Loads an mmfm checkpoint at `location`, or converts it with `source` (detected for a Hugging Face dir)."""
    from mmfm.convert import build_model, convert, list_sources, source_for_hf_directory
    from mmfm.convert.io import read_state_dict

    if source in (None, "mmfm") and location.is_file():
        config_path = location.parent / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(
                f"{location}: no {CONFIG_NAME} beside this weights file; an mmfm checkpoint needs one, and weights "
                f"of another library go through `mmfm convert {location} OUT/ --from SOURCE` "
                f"(sources: {', '.join(list_sources())})"
            )
        try:
            config = ModelConfig.from_file(config_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        return load_state(config, read_state_dict(location), str(location), strict=strict)
    if source is None and not (location / CONFIG_NAME).exists():
        source = source_for_hf_directory(location)
        if source is None:
            raise CheckpointError(
                f"{location}: no {CONFIG_NAME} in the checkpoint, and not a Hugging Face directory mmfm can convert "
                f"(a config.json with a known model_type); convert other weights with "
                f"`mmfm convert {location} OUT/ --from SOURCE` (sources: {', '.join(list_sources())})"
            )
    if source in (None, "mmfm"):
        return load_pretrained(location, strict=strict)
    converted = convert(source, location, **(convert_kwargs or {}))
    model, fresh = build_model(converted, base or DEFAULT_BASE, f"{location} ({source})", strict=strict)
    if fresh:
        warnings.warn(
            f"{location}: the {source} weights leave {', '.join(fresh)} freshly initialised (from {model.config.name})",
            stacklevel=3,
        )
    return model
