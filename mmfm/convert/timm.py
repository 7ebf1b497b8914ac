"""timm ViT-family checkpoints -> the mmfm image encoder (`encoders.image.vit.*` keys are timm's own).

```python
config, state = mmfm.convert.convert("timm", "b16.safetensors", model_name="vit_base_patch16_224.augreg2_in21k_ft_in1k")
converted = mmfm.convert.convert("timm", "hub_snapshot/")  # timm's hub layout: config.json + model.safetensors
model, fresh = mmfm.loader.from_converted(converted, "mmfm-small")  # or mmfm.load("vit-b-16-augreg-in21k-ft-in1k")
```

The model name (or the directory's config.json) decides the architecture, and the file must hold exactly its
weights: a file of another architecture is refused with every missing, unexpected and mis-shaped key listed.
Preprocessing (mean, std, crop, interpolation) comes from timm's pretrained config of that name and tag (or the
directory's), and the image size from the file's position embedding unless `img_size` asks for another, in
which case the position embedding is resampled bicubically. The classifier head is dropped unless
`keep_head=True`, which keeps it as the encoder's pooled head (`image.head_dim`): a CLIP image tower's
projection, say. timm is imported by the functions that call it, so registering this converter is cheap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmfm.config import ImageEncoderConfig
from mmfm.convert import Converted, register_converter
from mmfm.convert.io import read_hf_state_dict, read_state_dict
from mmfm.convert.keys import check_shapes, grid_of, resample_pos_embed
from mmfm.encoders.timm_vit import check_vit_name
from mmfm.errors import CheckpointError, ConfigError

PREFIX = "encoders.image.vit."
# timm model arguments mmfm's image config can express (`embed_dim` is `width` there; the rest keep their names).
_ARCH_ARGS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "pre_norm",
    "in_chans",
    "class_token",
    "reg_tokens",
    "global_pool",
)
# Classifier entries: dropped, or kept as the pooled head. `pre_logits` is an old representation layer timm drops.
_HEAD_PREFIXES = ("head.", "head_dist.")
_DROPPED_PREFIXES = ("pre_logits.",)


@register_converter("timm")
def convert_timm(
    path: str | Path,
    model_name: str | None = None,
    img_size: int | None = None,
    keep_head: bool = False,
    **model_args: Any,
) -> Converted:
    """Reads a timm ViT-family checkpoint as an mmfm image encoder.

    Args:
        path: a weights file (`.safetensors`, or `.pth`/`.bin` read with `weights_only=True`) or a timm hub
            directory (config.json + model.safetensors or pytorch_model.bin).
        model_name: the timm model name (with or without a pretrained tag); optional for a directory, whose
            config.json names it (a different name is an error).
        img_size: the encoder's input size; None keeps the checkpoint's. Another size resamples the
            position embedding.
        keep_head: keep the classifier/projection head as `image.head_dim` (else it is dropped).
        **model_args: timm architecture arguments that differ from the name's defaults (`embed_dim`, `depth`,
            `num_heads`, `patch_size`, `mlp_ratio`, `reg_tokens`, ...), for a checkpoint of a custom size.

    Returns:
        `{"image": ImageEncoderConfig}` and the weights under `encoders.image.vit.`.

    Raises:
        ConfigError: the name is not a timm ViT-family model, has no such pretrained tag, or an argument cannot
            be expressed by mmfm's image config.
        CheckpointError: the file is unreadable or is not this architecture's (keys listed).
    """
    path = Path(path)
    if path.is_dir():
        state, source, arch, pretrained, dir_args = _read_hub_directory(path, model_name)
        model_name = model_name or arch
        model_args = {**dir_args, **model_args}
    else:
        if model_name is None:
            raise ConfigError(f"{path}: converting a timm weights file needs model_name (the timm architecture)")
        state, source = read_state_dict(path), str(path)
        pretrained = _pretrained_cfg(model_name)
    check_vit_name("image", model_name)
    unsupported = sorted(set(model_args) - set(_ARCH_ARGS) - {"num_classes"})
    if unsupported:
        raise ConfigError(
            f"{source}: timm model arguments mmfm's image config cannot express: {', '.join(unsupported)} "
            f"(it takes {', '.join(_ARCH_ARGS)})"
        )
    if "visual.class_embedding" in state or "visual.conv1.weight" in state:
        raise CheckpointError(f"{source}: this is an open_clip / OpenAI CLIP checkpoint; convert it with 'open_clip'")
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}

    what = f"timm {model_name!r}" + (f" with {model_args}" if model_args else "")
    reference = _reference(model_name, model_args, source)
    prefix = 0 if reference.no_embed_class else reference.num_prefix_tokens
    grid = grid_of(state["pos_embed"], prefix) if "pos_embed" in state and reference.pos_embed is not None else None
    if grid is not None or img_size is not None:
        # The checkpoint decides the resolution unless asked for another; the reference is built at that size.
        patch = reference.patch_embed.patch_size[0]
        target = img_size or grid * patch
        if target != reference.patch_embed.img_size[0]:
            reference = _reference(model_name, {**model_args, "img_size": target}, source)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], target // patch, prefix, source)
    head = {k: v for k, v in state.items() if k.startswith(_HEAD_PREFIXES)}
    if keep_head and "head.weight" not in head:
        raise CheckpointError(f"{source}: keep_head=True but the checkpoint has no classifier head ('head.weight')")
    if not keep_head:
        state = {k: v for k, v in state.items() if k not in head}
    expected = {
        k: tuple(v.shape) for k, v in reference.state_dict().items() if keep_head or not k.startswith(_HEAD_PREFIXES)
    }
    if keep_head:  # the head's width is the file's, whatever the name's default class count
        expected.update({k: tuple(v.shape) for k, v in head.items()})
    check_shapes(expected, state, source, what)

    config = ImageEncoderConfig(
        model_name=model_name,
        img_size=img_size or reference.patch_embed.img_size[0],
        patch_size=reference.patch_embed.patch_size[0],
        width=reference.embed_dim,
        depth=len(reference.blocks),
        num_heads=reference.blocks[0].attn.num_heads,
        mlp_ratio=reference.blocks[0].mlp.fc1.out_features / reference.embed_dim,
        pre_norm=not isinstance(reference.norm_pre, nn.Identity),
        in_chans=reference.patch_embed.proj.in_channels,
        class_token=reference.cls_token is not None,
        reg_tokens=reference.num_reg_tokens,
        global_pool=reference.global_pool or None,
        head_dim=head["head.weight"].shape[0] if keep_head else 0,
        head_bias=not keep_head or "head.bias" in head,
        mean=tuple(pretrained["mean"]),
        std=tuple(pretrained["std"]),
        crop_pct=pretrained.get("crop_pct", 1.0),
        interpolation=pretrained.get("interpolation", "bicubic"),
    )
    return Converted({"image": config}, {PREFIX + k: v for k, v in state.items()})


def _read_hub_directory(
    directory: Path, model_name: str | None
) -> tuple[dict[str, Tensor], str, str, dict[str, Any], dict[str, Any]]:
    """Weights, their file, architecture, pretrained config and model arguments of a timm hub directory."""
    from timm.models import get_arch_name

    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
        arch = config["architecture"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory}: no config.json, so not a timm hub directory; pass a weights file"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: not a timm model config ({type(e).__name__}: {e})") from None
    if model_name is not None and get_arch_name(model_name) != arch:
        raise CheckpointError(f"{directory}: the checkpoint is timm '{arch}', not {model_name!r}")
    state, weights = read_hf_state_dict(directory)
    pretrained = config.get("pretrained_cfg") or _pretrained_cfg(arch)
    return state, str(weights), arch, pretrained, dict(config.get("model_args") or {})


def _pretrained_cfg(model_name: str) -> dict[str, Any]:
    """timm's pretrained config of a name (its tag, or the architecture's default tag) as a dict."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError as e:  # timm's error for a tag the architecture does not have
        raise ConfigError(f"image.model_name: {e}") from None
    if cfg is None:
        raise ConfigError(f"image.model_name: timm has no pretrained config for {model_name!r}")
    return cfg.to_dict()


def _reference(model_name: str, model_args: dict[str, Any], source: str) -> nn.Module:
    """The named architecture with these arguments, built on the meta device (shapes only, no memory)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(model_name, pretrained=False, **model_args)
    except (AssertionError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{source}: timm cannot build {model_name!r} with {model_args}: {e}") from e
