"""diffusers `UNet2DConditionModel` directories (bare, or a pipeline's unet/ + vae/ + scheduler/) -> the image_gen head.

```python
converted = mmfm.convert.convert("diffusers", "pipeline/")      # unet/, and vae/ and scheduler/ when present
converted = mmfm.convert.convert("diffusers", "unet/", vae_path="vae/")   # a bare UNet and its VAE
model, fresh = mmfm.loader.from_converted(converted, base="mmfm-base")
```

mmfm's image generation head builds its denoiser as a diffusers `UNet2DConditionModel`
(`mmfm.heads.image_gen.build_denoiser`), so the key map is the identity under a prefix:

    {key}                                   -> heads.image_gen.denoiser.{key}
    (none)                                  -> heads.image_gen.null_cond = zeros(cross_attention_dim)

The head's learned null condition for classifier-free guidance has no diffusers counterpart (a pipeline encodes
an empty prompt instead), so it starts at the head's own initial value, zeros, as in a fresh mmfm head; training
with `cond_dropout` > 0 learns it.

What has to be translated is the config. The UNet's config.json gives `ImageGenHeadConfig`'s architecture:
`block_out_channels`, `layers_per_block`, `norm_num_groups`, `sample_size` (-> `image_size`, times the VAE's
downsampling factor in latent space), `in_channels` (-> `channels` in pixel space), and `attention_head_dim`,
which diffusers reads as the number of heads per level (a naming slip it keeps), so mmfm's channels per head
is `block_out_channels[i] / attention_head_dim[i]` and must be one whole number at every level. The head builds
every other UNet argument at diffusers' default, so a config.json that sets any of them otherwise (a
`DownBlock2D` level, class or addition embeddings, `use_linear_projection`, `transformer_layers_per_block` 2,
...) is refused with one `ConfigError` naming each field and value.

`cross_attention_dim` is the width of the states the UNet reads, which in mmfm are the backbone's, so the
converted config sets `backbone.dim` to it (merged over the base preset: the backbone keeps the base's depth and
heads). Conversion never brings backbone weights (it is always freshly initialised), so this costs nothing the
base had; a base whose `backbone.num_heads` does not divide that width is refused by config validation, which
names both fields. Like the towers of the other converters, the head's config is the checkpoint's as a whole
(`ImageGenHeadConfig`): sampling defaults (`scheduler`, `num_inference_steps`, `guidance_scale`) and
`cond_dropout` are `ImageGenHeadConfig`'s defaults, not the base preset's.

A pipeline's scheduler/scheduler_config.json gives the noise schedule: `num_train_timesteps`, `beta_schedule`,
`beta_start`, `beta_end`, `prediction_type`, `timestep_spacing` (fields it lacks take `DDPMScheduler`'s
defaults). The scheduler class and its sampler-only settings (`steps_offset`, `clip_sample`, ...) are not
carried: mmfm picks its sampler when sampling. Schedules mmfm cannot train with (trained betas, zero-SNR
rescaling, flow matching, "sample" prediction) are refused.

With a VAE (a pipeline's vae/, or `vae_path=`) the head works in latent space. The VAE is not converted: it stays
the diffusers `AutoencoderKL` it is, and `image_gen.vae_path` names its directory (absolute), which the head
loads it from when the model is built. `save_pretrained` (and so `mmfm convert ... --from diffusers`) copies it
into the checkpoint's own `vae/` folder, so the written checkpoint no longer needs the source directory (see
`mmfm.heads.image_gen`).

A pipeline's text encoder and tokenizer are not read: in mmfm the UNet cross-attends to the backbone's states,
which are freshly initialised, so a converted UNet's conditioning means nothing until the model is trained. A
diffusers directory has no config.json `model_type`, so `mmfm.load` does not recognise one; go through
`convert` + `mmfm.loader.from_converted`, or `mmfm convert DIR OUT/ --from diffusers`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch
from torch import Tensor

from mmfm.config import ImageGenHeadConfig
from mmfm.convert import Converted, register_converter
from mmfm.convert.io import read_state_dict
from mmfm.convert.keys import check_shapes
from mmfm.errors import CheckpointError, ConfigError

PREFIX = "heads.image_gen.denoiser."
NULL_COND = "heads.image_gen.null_cond"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# Weight files of a diffusers model directory, preferred first: (single file, shard index).
WEIGHT_FILES = (
    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
)
UNET_CLASS = "UNet2DConditionModel"
VAE_CLASS = "AutoencoderKL"
# The blocks mmfm's head builds at every level (and in the middle).
DOWN_BLOCK, UP_BLOCK, MID_BLOCK = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"
# UNet config.json fields the converter translates; every other argument must be diffusers' default.
_TRANSLATED = {
    "sample_size",
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "cross_attention_dim",
    "attention_head_dim",
}
# Read only by addition embeddings, which are refused on their own field.
_INERT = {"addition_embed_type_num_heads"}
SCHEDULE_FIELDS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "timestep_spacing",
)


@register_converter("diffusers")
def convert_diffusers(path: str | Path, vae_path: str | Path | None = None, variant: str | None = None) -> Converted:
    """Reads a diffusers UNet (bare, or in a pipeline directory) as mmfm's image_gen head.

    Args:
        path: a pipeline directory (`unet/`, optionally `vae/` and `scheduler/`), or a UNet directory
            (config.json + diffusion_pytorch_model.safetensors or .bin, or their shard index).
        vae_path: a diffusers `AutoencoderKL` directory to work in the latent space of (default: the pipeline's
            `vae/`, if any; a bare UNet without it works on pixels).
        variant: the weights' variant, as diffusers names it ("fp16" reads diffusion_pytorch_model.fp16.safetensors).

    Returns:
        `config = {"image_gen": ImageGenHeadConfig(...), "backbone": {"dim": cross_attention_dim}}`, and the UNet's
        weights under `heads.image_gen.denoiser.` with a zero `heads.image_gen.null_cond`.

    Raises:
        CheckpointError: a missing or unreadable file (named), a model other than a `UNet2DConditionModel` /
            `AutoencoderKL`, or weights that do not fit the config (missing, unexpected, mis-shaped keys listed).
        ConfigError: UNet, VAE or scheduler settings mmfm's head cannot represent, each field named with its value.
    """
    from mmfm.heads.image_gen import build_denoiser  # imports diffusers (seconds): only when converting

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: a diffusers model is a directory (a pipeline, or config.json + weights)")
    pipeline = (directory / "unet").is_dir()
    unet_dir = directory / "unet" if pipeline else directory
    if not pipeline and not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{directory}: no {CONFIG_NAME} (a diffusers UNet directory) and no unet/ folder (a pipeline directory)"
        )
    unet = _read_json(unet_dir / CONFIG_NAME, required=True)
    if vae_path is None and pipeline and (directory / "vae").is_dir():
        vae_path = directory / "vae"
    vae_dir = None if vae_path is None else Path(vae_path).absolute()
    vae = None if vae_dir is None else _read_json(vae_dir / CONFIG_NAME, required=True)
    scheduler = _read_json(directory / SCHEDULER_CONFIG, required=False) if pipeline else None

    geometry = unet_geometry(unet, str(unet_dir / CONFIG_NAME))
    factor, channels = 1, geometry["in_channels"]
    if vae is not None:
        factor, channels = _vae_geometry(vae, geometry["in_channels"], str(vae_dir / CONFIG_NAME))
    elif channels not in (1, 3):
        raise ConfigError(
            f"{unet_dir / CONFIG_NAME}: in_channels {channels} cannot be pixels (1 or 3 channels); a latent-space UNet "
            "needs its VAE: a vae/ folder beside unet/, or vae_path="
        )
    head = ImageGenHeadConfig(
        space="pixel" if vae_dir is None else "latent",
        architecture="unet",
        image_size=geometry["sample_size"] * factor,
        channels=channels,
        vae_path=None if vae_dir is None else str(vae_dir),
        block_out_channels=geometry["block_out_channels"],
        layers_per_block=geometry["layers_per_block"],
        attention_head_dim=geometry["attention_head_dim"],
        norm_num_groups=geometry["norm_num_groups"],
        **noise_schedule_fields(scheduler, str(directory / SCHEDULER_CONFIG)),
    )
    state, weights_file = read_diffusers_state_dict(unet_dir, variant)
    dim = geometry["cross_attention_dim"]
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        reference = build_denoiser(head, dim, geometry["in_channels"], geometry["sample_size"])
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    check_shapes(expected, state, str(weights_file), f"the {UNET_CLASS} its {CONFIG_NAME} describes")
    out = {PREFIX + k: v for k, v in state.items()}
    out[NULL_COND] = torch.zeros(dim)  # the head's own initial value; see the module docstring
    return Converted({"image_gen": head, "backbone": {"dim": dim}}, out)


def unet_geometry(unet: dict[str, Any], source: str) -> dict[str, Any]:
    """The architecture fields of a `UNet2DConditionModel` config.json, in mmfm's terms.

    Args:
        unet: the parsed config.json.
        source: its path, named in errors.

    Returns:
        {"sample_size", "in_channels", "block_out_channels", "layers_per_block", "norm_num_groups",
        "cross_attention_dim", "attention_head_dim" (channels per head)}.

    Raises:
        CheckpointError: another diffusers class.
        ConfigError: listing every setting mmfm's head cannot represent, with its value.
    """
    name = unet.get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        raise CheckpointError(f"{source}: _class_name is {name!r}, not {UNET_CLASS!r}; mmfm's head is that UNet")
    from diffusers import UNet2DConditionModel

    defaults = {
        k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items() if k != "self"
    }
    value = {**defaults, **unet}.get
    problems = []
    widths = list(value("block_out_channels"))
    levels = len(widths)
    for key, block in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = list(value(key))
        if len(types) != levels or any(t != block for t in types):
            problems.append(f"{key} {types} (mmfm's head has a {block} at each of the {levels} levels)")
    if value("mid_block_type") != MID_BLOCK:
        problems.append(f"mid_block_type {value('mid_block_type')!r} (mmfm's head has a {MID_BLOCK})")
    if value("in_channels") != value("out_channels"):
        problems.append(f"in_channels {value('in_channels')} != out_channels {value('out_channels')}")
    layers = _one_value(value("layers_per_block"), levels)
    if layers is None:
        problems.append(f"layers_per_block {value('layers_per_block')} (mmfm's head has one count for every level)")
    cross = _one_value(value("cross_attention_dim"), levels)
    if cross is None:
        problems.append(f"cross_attention_dim {value('cross_attention_dim')} (mmfm's condition has one width)")
    groups = value("norm_num_groups")
    if groups is None:
        problems.append("norm_num_groups null (mmfm's head always has GroupNorm)")
    size = value("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1] else size
    if not isinstance(size, int):
        problems.append(f"sample_size {size!r} (mmfm's head makes square images of one default side)")
    heads = value("attention_head_dim")  # diffusers' name for the number of heads per level
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    per_head = [w / h if h else float("nan") for w, h in zip(widths, heads)]
    if len(heads) != levels or len(set(per_head)) != 1 or not per_head[0].is_integer():
        problems.append(
            f"attention_head_dim {value('attention_head_dim')} (heads per level, as diffusers names it) gives "
            f"{[round(c, 3) for c in per_head]} channels per head over block_out_channels {widths}; mmfm's head "
            "needs one whole number of channels per head at every level"
        )
    for key, given in unet.items():
        if key.startswith("_") or key in _TRANSLATED or key in _INERT or key not in defaults:
            continue  # metadata, the fields above, and keys this diffusers ignores too
        if not _is_default(key, given, defaults[key]):
            problems.append(f"{key} {given!r} (mmfm's head builds diffusers' default, {defaults[key]!r})")
    if problems:
        raise ConfigError(f"{source}: UNet settings mmfm's image_gen head cannot represent: " + "; ".join(problems))
    return {
        "sample_size": size,
        "in_channels": value("in_channels"),
        "block_out_channels": widths,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "cross_attention_dim": cross,
        "attention_head_dim": int(per_head[0]),
    }


def noise_schedule_fields(scheduler: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """`ImageGenHeadConfig`'s noise schedule fields from a parsed scheduler_config.json ({} for None).

    Raises:
        ConfigError: a schedule mmfm cannot train or sample with, naming each field and value.
    """
    if scheduler is None:
        return {}
    name = scheduler.get("_class_name", "a scheduler")
    if "beta_schedule" not in scheduler:
        raise ConfigError(
            f"{source}: {name} has no beta_schedule; mmfm's head uses a DDPM-family (beta) noise schedule"
        )
    from diffusers import DDPMScheduler

    defaults = {k: p.default for k, p in inspect.signature(DDPMScheduler.__init__).parameters.items()}
    fields = {key: scheduler.get(key, defaults[key]) for key in SCHEDULE_FIELDS}
    hints = get_type_hints(ImageGenHeadConfig)
    problems = [
        f"{key} {fields[key]!r} (mmfm's head takes {', '.join(map(repr, get_args(hints[key])))})"
        for key in ("beta_schedule", "prediction_type", "timestep_spacing")
        if fields[key] not in get_args(hints[key])
    ]
    if scheduler.get("trained_betas"):
        problems.append("trained_betas (mmfm's head computes its betas from beta_schedule)")
    if scheduler.get("rescale_betas_zero_snr"):
        problems.append("rescale_betas_zero_snr true (mmfm's schedule is not rescaled)")
    if problems:
        raise ConfigError(f"{source}: noise schedule settings mmfm's image_gen head cannot use: " + "; ".join(problems))
    return fields


def read_diffusers_state_dict(directory: str | Path, variant: str | None = None) -> tuple[dict[str, Tensor], Path]:
    """Reads the weights of a diffusers model directory, single-file or sharded, through `mmfm.convert.io`.

    Prefers diffusion_pytorch_model.safetensors (or its shard index) over diffusion_pytorch_model.bin (or its index);
    `variant` "fp16" reads diffusion_pytorch_model.fp16.safetensors and so on, as diffusers names them.

    Returns:
        The state dict and the file (or index) it came from, for error messages.
    """
    directory = Path(directory)
    for single, index in WEIGHT_FILES:
        single, index = _with_variant(single, variant), _with_variant(index, variant)
        if (directory / single).is_file():
            return read_state_dict(directory / single), directory / single
        if (directory / index).is_file():
            try:
                files = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{directory / index}: not a valid shard index ({e})") from None
            state: dict[str, Tensor] = {}
            for name in files:
                state.update(read_state_dict(directory / name))
            return state, directory / index
    looked_for = ", ".join(_with_variant(n, variant) for pair in WEIGHT_FILES for n in pair)
    others = sorted(p.name for p in directory.glob("diffusion_pytorch_model.*"))
    found = f"; found {', '.join(others)} (another variant=?)" if others else ""
    raise CheckpointError(f"{directory}: no weights file in this directory (looked for {looked_for}){found}")


def _vae_geometry(vae: dict[str, Any], unet_channels: int, source: str) -> tuple[int, int]:
    """(downsampling factor, pixel channels) of an `AutoencoderKL` config.json whose latents the UNet denoises."""
    name = vae.get("_class_name", VAE_CLASS)
    if name != VAE_CLASS:
        raise CheckpointError(f"{source}: _class_name is {name!r}, not {VAE_CLASS!r}; mmfm's head loads that VAE")
    latent = vae.get("latent_channels", 4)
    if latent != unet_channels:
        raise ConfigError(
            f"{source}: latent_channels {latent} != the UNet's in_channels {unet_channels}; not this UNet's VAE"
        )
    return 2 ** (len(vae.get("block_out_channels", [64])) - 1), vae.get("in_channels", 3)


def _one_value(value: Any, levels: int) -> int | None:
    """An int, or a per-level list holding one int `levels` times, as that int; else None."""
    if isinstance(value, int):
        return value
    values = list(value) if isinstance(value, (list, tuple)) else []
    return values[0] if len(values) == levels and len(set(values)) == 1 and isinstance(values[0], int) else None


def _is_default(key: str, value: Any, default: Any) -> bool:
    """Whether a config.json value builds what diffusers' default does: per-level lists of it count too."""
    if key == "mid_block_only_cross_attention" and value is False:
        return True  # None means "as only_cross_attention", which must be False
    if isinstance(value, (list, tuple)) and not isinstance(default, (list, tuple)):
        return len(value) > 0 and all(_is_default(key, v, default) for v in value)
    return value == default


def _with_variant(name: str, variant: str | None) -> str:
    """As diffusers names variants: "x.safetensors" -> "x.fp16.safetensors", "x.index.json" -> "x.index.fp16.json"."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing; a diffusers model directory needs it")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
