"""The one loader: every way a model comes into being, a random architecture or saved or converted weights.

`create_model` builds random weights from a name or YAML; `load` reads weights from an explicit source:

- a path that exists: an mmfm checkpoint folder (config.yaml + model.safetensors or shards), a weights file with
  config.yaml beside it, or a Hugging Face folder whose config.json `model_type` a converter reads;
- a tag from `mmfm.list_pretrained()`;
- `hf-hub:org/name`, a Hugging Face hub repository. Only this prefix reaches the hub, as in timm, so a
  mistyped local path is an error, never a download.

The trainer, the CLI and `mmfm convert` load through this module. Models are built with their parameters on the
meta device and take the checkpoint's tensors as they are (memory-mapped safetensors stay mapped).

A checkpoint reads only regular files inside its own folder: its config's `text.vocab` and `image_gen.vae_path`,
and its shard index's files, must lie inside it (symbolic links inside it are followed, as a hub cache has them).
"""

from __future__ import annotations

import inspect
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mmfm.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SHARD_PATTERN,
    TENSOR_ALIGNMENT,
    VAE_FOLDER,
    VOCAB_NAMES,
    WEIGHTS_NAME,
    checkpoint_file,
    is_checkpoint_folder,
    load_weights,
    parameters_on_meta,
    read_weights,
    unique_state_dict,
)
from mmfm.config import DTYPE_NAMES, ModelConfig, quote, shorten
from mmfm.errors import CheckpointError, ConfigError, InputError
from mmfm.model import MultimodalModel
from mmfm.pretrained import download_hub, fetch, get_pretrained, is_pretrained_tag
from mmfm.registry import get_config, read_config

__all__ = [
    "DTYPES",
    "HUB_PREFIX",
    "build_from_weights",
    "check_convert_output",
    "check_export_output",
    "create_model",
    "for_finetuning",
    "from_converted",
    "load",
    "open_model",
    "parse_dtype",
    "upgrade_keys",
]

HUB_PREFIX = "hf-hub:"
# The preset that supplies what converted weights (one tower, say) do not bring, unless a tag or caller says.
DEFAULT_BASE = "mmfm-base"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
YAML_SUFFIXES = (".yaml", ".yml")
# State-dict keys of earlier mmfm releases -> today's (`upgrade_keys`).
RENAMED_KEYS = {"encoders.text.embed.weight": "token_embedding.weight"}


def create_model(name_or_path: str | Path, **overrides: Any) -> MultimodalModel:
    """A randomly initialised model from a registered preset name or a YAML config/recipe file.

    Args:
        name_or_path: a preset name (`mmfm.list_models()`), a shipped config name (`mmfm.list_configs()`), or
            the path of a `.yaml` file.
        **overrides: config fields to change, nested (`backbone={"depth": 2}`); dotted keys go through a
            dict: `create_model(name, **{"backbone.depth": 2})`.
    """
    path = Path(name_or_path)
    config = read_config(path) if path.suffix in YAML_SUFFIXES else get_config(str(name_or_path))
    source = str(name_or_path)
    if overrides:
        source = f"{name_or_path} with overrides {quote(overrides, 200)}"
        config = config.with_overrides(overrides, source=source)
    try:
        return MultimodalModel(config)
    except ConfigError as e:  # an encoder refused its settings: say which config they came from
        raise ConfigError(f"{source}: {e}") from e


def load(
    spec: str | Path,
    *,
    strict: bool = True,
    base: str | ModelConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> MultimodalModel:
    """Loads a pretrained model, in eval mode, from an explicit source (see the module docstring).

    Args:
        spec: a local folder or weights file, a pretrained tag, or "hf-hub:org/name".
        strict: refuse missing or unexpected weights, and weights holding NaN or infinity (with strict=False
            those load with a RuntimeWarning naming them); mis-shaped weights are always refused. For weights
            converted from another library, "missing" means missing from the components they bring.
        base: for converted weights, the preset name or config that supplies the other components (they are
            freshly initialised, with a warning); default: the tag's base, else "mmfm-base".
        device: where the model goes, e.g. "cuda"; default: the CPU.
        dtype: the parameters' dtype (torch.bfloat16 or "bfloat16", ...); the weights are converted once, as
            they are read.

    Raises:
        CheckpointError: naming the input and what was wrong with it.
    """
    text = str(spec)
    dtype = parse_dtype(dtype)
    if text.startswith(HUB_PREFIX):
        model = _load_local(download_hub(text.removeprefix(HUB_PREFIX)), strict, base, dtype)
    elif _exists(spec):
        model = _load_local(Path(spec), strict, base, dtype)
    elif is_pretrained_tag(text):
        entry = get_pretrained(text)
        location = fetch(entry)
        model = _load_local(location, strict, base or entry.base, dtype, entry.source, entry.convert_kwargs)
    else:
        raise CheckpointError(
            f"{shorten(text)}: no such checkpoint directory or file, nor a pretrained tag (see "
            f"mmfm.list_pretrained()); a Hugging Face hub repository is written with its prefix: '{HUB_PREFIX}org/name'"
        )
    return model.to(device) if device is not None else model


def open_model(
    spec: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> tuple[MultimodalModel, bool]:
    """What a `--model` argument names: saved weights (`load`), or an architecture with random weights.

    Args:
        spec: anything `load` takes, or a preset name or YAML config for `create_model`.
        device: where the model goes.
        dtype: the parameters' dtype.

    Returns:
        The model in eval mode, and whether its weights are random (an architecture, not a checkpoint).
    """
    text = str(spec)
    architecture = Path(spec).suffix in YAML_SUFFIXES or not (
        _exists(spec) or text.startswith(HUB_PREFIX) or is_pretrained_tag(text) or "/" in text
    )
    if not architecture:
        return load(spec, device=device, dtype=dtype), False
    model = create_model(spec).eval()
    dtype = parse_dtype(dtype)
    return model.to(device=device, dtype=dtype), True


def check_convert_output(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Checks that converting `src` into the folder `out` (`mmfm convert SRC OUT`) can lose no file; returns `out`.

    Refused, whatever `overwrite` says: an output that is the input or lies inside it, an input that the save
    into `out` would replace (`OUT/model.safetensors`, `OUT/config.yaml`, ...), and an output that is a file.
    Refused unless `overwrite=True`: an output folder that holds files but is not an mmfm checkpoint (a
    `config.yaml` and weights written by `save_pretrained`). An mmfm checkpoint folder is replaced by the new
    model; other files in it are left alone (see `mmfm.checkpoint.save_pretrained`).

    Args:
        src: the checkpoint to convert, a file or a folder.
        out: the folder to write the mmfm checkpoint into; created if missing.
        overwrite: allow writing into a folder that holds other files.

    Raises:
        CheckpointError: naming OUT (and SRC) and what is wrong, with what to do instead.
    """
    out = Path(out)
    source, target, target_kind = _resolved_output(src, out)
    if target == source or source in target.parents:
        raise CheckpointError(
            f"{out}: the output is the input {src} or lies inside it; converting there would overwrite the weights "
            "being read: write into another folder"
        )
    if _written_by_save(source, target):
        raise CheckpointError(
            f"{out}: saving there would replace the input {src} (a file an mmfm checkpoint of that name writes): "
            "write into another folder"
        )
    if target_kind is None:
        return out
    if not stat.S_ISDIR(target_kind):
        raise CheckpointError(f"{out}: the output must be a folder, and this is a file")
    if not overwrite and not is_checkpoint_folder(target):
        shown = _entries(target)
        if shown:
            raise CheckpointError(
                f"{out}: the output folder holds files ({shown}) and is not an mmfm checkpoint; converting into it "
                f"writes {CONFIG_NAME}, {WEIGHTS_NAME} ... beside them and replaces files of those names: choose a "
                "new or empty folder, or pass overwrite=True (`mmfm convert --overwrite`) to write there anyway"
            )
    return out


def check_export_output(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Checks that exporting `src` into the folder `out` (`mmfm export SRC OUT`) can lose no file; returns `out`.

    Refused: an output that is a file, that is the input or holds it, and (unless `overwrite=True`) a folder that
    holds files, since an export writes files of its own names (config.json, model.safetensors, ...).

    Raises:
        CheckpointError: naming OUT (and SRC) and what is wrong, with what to do instead.
    """
    out = Path(out)
    source, target, target_kind = _resolved_output(src, out)
    if target == source or target in source.parents:
        raise CheckpointError(
            f"{out}: the output folder is the input {src} or holds it; exporting there could overwrite what is "
            "being read: write into another folder"
        )
    if target_kind is not None and not stat.S_ISDIR(target_kind):
        raise CheckpointError(f"{out}: the output must be a folder, and this is a file")
    shown = _entries(target) if target_kind is not None else ""
    if shown and not overwrite:
        raise CheckpointError(
            f"{out}: the output folder holds files ({shown}); exporting replaces files of the names it writes: "
            "choose a new or empty folder, or pass overwrite=True (`mmfm export --overwrite`) to write there anyway"
        )
    return out


def _resolved_output(src: str | Path, out: Path) -> tuple[Path, Path, int | None]:
    """SRC and OUT resolved, and OUT's file mode (None when it does not exist); CheckpointError if unusable."""
    try:
        source, target = Path(src).resolve(), out.resolve()
        return source, target, target.stat().st_mode if target.exists() else None
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{shorten(str(out))}: not a usable output folder ({e})") from None


def _entries(folder: Path) -> str:
    """The names in a folder, the first five and how many more; "" for an empty one."""
    entries = sorted(p.name for p in folder.iterdir())
    return ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def _written_by_save(path: Path, folder: Path) -> bool:
    """Whether `save_pretrained(model, folder)` may write over `path` (both resolved)."""
    if path.parent == folder:
        names = (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, *VOCAB_NAMES.values())
        return path.name in names or bool(SHARD_PATTERN.fullmatch(path.name))
    return path == folder / VAE_FOLDER or folder / VAE_FOLDER in path.parents


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from itself or its name ("float32", "bfloat16", "float16"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def upgrade_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's state dict with the keys of earlier mmfm releases renamed to today's (`RENAMED_KEYS`)."""
    return {RENAMED_KEYS.get(k, k): v for k, v in state.items()}


def build_from_weights(
    config: ModelConfig,
    state: dict[str, Tensor],
    source: str,
    strict: bool = True,
    required: tuple[str, ...] | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
) -> MultimodalModel:
    """Builds the model `config` describes around the weights in `state`; returns it in eval mode.

    The model is built with its parameters on the meta device and takes `state`'s tensors as they are
    (memory-mapped safetensors stay mapped), so loading neither initialises nor copies the weights. When
    `state` lacks some weights (allowed by `strict=False` or `required`), the model is built normally instead,
    so those keep their fresh initialisation.

    Args:
        config: the model's config.
        state: weights under `MultimodalModel` keys (earlier releases' keys are renamed).
        source: the file or directory they came from, named in errors.
        strict: refuse missing or unexpected weights (mis-shaped weights are always refused).
        required: with strict, only keys under these prefixes count as missing (see `checkpoint.load_weights`).
        dtype: convert the weights to this dtype as they are taken (default: keep the model's float32).
        tokenizer: a ready tokenizer for the model (`mmfm.convert.Converted.tokenizer`); None builds the config's.
    """
    state = upgrade_keys(state)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    # Tensors of another library's file may start anywhere (a Hugging Face safetensors header is 8-byte aligned);
    # CPU kernels sum in an order that depends on alignment, so the same weights would give other low bits than
    # after save_pretrained (which aligns them, `TENSOR_ALIGNMENT`). Those few are copied into aligned memory.
    state = {k: v if v.data_ptr() % TENSOR_ALIGNMENT == 0 else v.clone() for k, v in state.items()}
    with parameters_on_meta():
        model = MultimodalModel(config, tokenizer)
    if set(unique_state_dict(model)) - set(state):
        model = MultimodalModel(config, tokenizer)
    if dtype is not None:
        model.to(dtype)
    load_weights(model, state, source, strict=strict, required=required)
    return model.eval()


def from_converted(
    converted: Any,
    base: ModelConfig | str | None = None,
    source: str = "<converted>",
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[MultimodalModel, list[str]]:
    """The model holding a converter's weights (`mmfm.convert.convert`); components they lack come from `base`.

    Args:
        converted: a converter's output (`mmfm.convert.Converted`).
        base: the config, or preset name, that supplies every component the converter did not bring; None: the
            converter's own suggestion (`Converted.base`: text-only for a language model), else `DEFAULT_BASE`.
        source: the checkpoint's name for error messages.
        strict: refuse weights the model has no place for, and missing weights inside the components the
            converted weights bring (mis-shaped weights are always refused).
        dtype: the parameters' dtype; the weights are converted as they are taken.

    Returns:
        The model in eval mode, and the names of its freshly initialised components ("backbone",
        "heads.caption", ...), empty when the weights cover the whole model.
    """
    from mmfm.convert import build_config, component_of

    config = build_config(converted.config, base or converted.base or DEFAULT_BASE)
    brought = tuple(sorted({component_of(k) + "." for k in converted.state_dict}))
    model = build_from_weights(
        config,
        converted.state_dict,
        source,
        strict=strict,
        required=brought,
        dtype=dtype,
        tokenizer=converted.tokenizer,
    )
    if dtype is not None:
        model.to(dtype)  # freshly initialised components too
    # `k + "."`: a component can be a single tensor (heads.contrastive.logit_scale)
    return model, sorted({component_of(k) for k in unique_state_dict(model) if not (k + ".").startswith(brought)})


def for_finetuning(directory: str | Path, overrides: dict[str, Any]) -> tuple[MultimodalModel, list[str]]:
    """A saved model rebuilt with config `overrides`, in train-ready form, and notes on how it was initialised.

    Head weights the overrides make meaningless start fresh and are named in the notes: every head weight
    whose shape changed, and the whole classify head when its labels changed (even to as many new labels,
    whose rows would otherwise silently keep the old classes' meaning).
    """
    directory = Path(directory)
    saved = _read_config(directory / CONFIG_NAME)
    config = saved.with_overrides(overrides, f"{directory} + model_overrides")
    model = MultimodalModel(config)
    state = upgrade_keys(read_weights(directory))
    expected = unique_state_dict(model)
    fresh = {k for k in state if k in expected and k.startswith("heads.") and state[k].shape != expected[k].shape}
    relabelled = saved.classify is not None and config.classify is not None
    if relabelled and saved.classify.labels != config.classify.labels:
        fresh |= {k for k in state if k.startswith("heads.classify.")}
    for key in fresh:
        del state[key]
    notes = [n for n in load_weights(model, state, str(directory), strict=False) if n.split(": ", 1)[1] not in fresh]
    return model, notes + [f"re-initialised (new labels or shape): {k}" for k in sorted(fresh)]


def _load_local(
    location: Path,
    strict: bool,
    base: str | ModelConfig | None,
    dtype: torch.dtype | None,
    source: str | None = None,
    convert_kwargs: dict[str, Any] | None = None,
) -> MultimodalModel:
    """Loads an mmfm checkpoint at `location`, or converts it with `source` (detected for a Hugging Face dir)."""
    from mmfm.convert import convert, get_converter, list_sources, source_for_hf_directory
    from mmfm.convert.io import read_state_dict

    if source is None and location.suffix.lower() == ".gguf" and location.is_file():
        source = "gguf"
    if source in (None, "mmfm") and location.is_file():
        config_path = location.parent / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(
                f"{location}: no {CONFIG_NAME} beside this weights file; an mmfm checkpoint needs one, and weights "
                f"of another library go through `mmfm convert {location} OUT/ --from SOURCE` "
                f"(sources: {', '.join(list_sources())})"
            )
        return build_from_weights(
            _read_config(config_path), read_state_dict(location), str(location), strict=strict, dtype=dtype
        )
    if source is None and not (location / CONFIG_NAME).exists():
        source = source_for_hf_directory(location)
        if source is None:
            raise CheckpointError(
                f"{location}: no {CONFIG_NAME} in the checkpoint, and not a Hugging Face directory mmfm can convert "
                f"(a config.json with a known model_type); convert other weights with "
                f"`mmfm convert {location} OUT/ --from SOURCE` (sources: {', '.join(list_sources())})"
            )
    if source in (None, "mmfm"):
        config = _read_config(location / CONFIG_NAME)
        return build_from_weights(config, read_weights(location), str(location), strict=strict, dtype=dtype)
    kwargs = dict(convert_kwargs or {})
    if dtype is not None and "dtype" in inspect.signature(get_converter(source)).parameters:
        kwargs["dtype"] = dtype  # a converter that makes its tensors in the dtype asked for (GGUF dequantizing)
    converted = convert(source, location, **kwargs)
    model, fresh = from_converted(converted, base, f"{location} ({source})", strict=strict, dtype=dtype)
    if fresh:
        warnings.warn(
            f"{location}: the {source} weights leave {', '.join(fresh)} freshly initialised (from {model.config.name})",
            stacklevel=3,
        )
    return model


def _read_config(path: Path) -> ModelConfig:
    """The config.yaml of a checkpoint folder, whose vocabulary and VAE must lie inside that folder."""
    directory = path.parent
    if not os.path.lexists(path):
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} in the checkpoint")
    checkpoint_file(directory, path.name, "config")
    try:
        config = read_config(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:  # a binary or unreadable file, should the reader let it through
        raise CheckpointError(f"{path}: cannot be read as a config ({e})") from None
    if config.text.vocab is not None:
        checkpoint_file(directory, _inside(directory, config.text.vocab, "text.vocab"), "text.vocab")
    if config.image_gen is not None and config.image_gen.vae_path is not None:
        _check_vae(directory, _inside(directory, config.image_gen.vae_path, "image_gen.vae_path"))
    return config


def _inside(directory: Path, value: str, key: str) -> str:
    """`value` (a path a checkpoint's config names, resolved against its folder) relative to `directory`."""
    try:
        relative = os.path.relpath(value, directory.absolute())
    except ValueError:  # another drive
        relative = value
    if os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: {key} {value!r} lies outside the checkpoint folder; a checkpoint reads only "
            "files inside its own folder (save_pretrained copies them in: re-save the model, or copy the file into "
            "the folder and name it relative to it)"
        )
    return relative


def _check_vae(directory: Path, relative: str) -> None:
    """The checkpoint's VAE is a folder inside it whose files are regular files."""
    folder = directory / relative
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: image_gen.vae_path is not a folder (a diffusers AutoencoderKL directory)")
    checkpoint_file(folder, "config.json", "VAE config (image_gen.vae_path)")
    for file in sorted(folder.iterdir()):
        if file.name.startswith("diffusion_pytorch_model"):
            checkpoint_file(folder, file.name, "VAE weights (image_gen.vae_path)")


def _exists(spec: str | Path) -> bool:
    """Whether `spec` names an existing file or folder; a name no file system takes is a `CheckpointError`."""
    try:
        return Path(spec).exists()
    except (OSError, ValueError) as e:  # too long a name, a NUL character
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"{shorten(str(spec))}: not a usable path ({reason})") from None
