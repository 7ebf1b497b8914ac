"""open_clip CLIP checkpoints -> an mmfm image tower (a timm ViT with CLIP's projection head) and text tower.

```python
converted = mmfm.convert.convert("open_clip", "clip_b32/")  # open_clip_config.json + open_clip_model.safetensors
converted = mmfm.convert.convert("open_clip", "b32.bin", model_name="ViT-B-32", towers=("text",))
model, _ = mmfm.loader.from_converted(converted, "mmfm-base")
model.classify(images=["cat.jpg"], labels=["cat", "dog"])             # zero-shot through both towers
```

The visual tower becomes the mmfm image encoder: timm's CLIP ViT layout (`vit_base_patch16_clip_224`, pre-norm,
bias-free patch embedding; the QuickGELU variant for OpenAI-style models) at the checkpoint's width, depth and
patch size, with class-token pooling and CLIP's visual projection as a bias-free head. The text tower becomes
`towers.text` (mmfm's `TextTower`, kind "clip") with open_clip's BPE tokenizer. The contrastive head takes both
embeddings from the towers and the logit scale from the checkpoint, so `model.classify(images, labels=...)`
gives open_clip's zero-shot probabilities. Architecture features mmfm does not model (ResNet or timm trunks,
Hugging Face text towers, layer scale, attentional pooling, SigLIP's logit bias, ...) are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mmfm.config import (
    ContrastiveHeadConfig,
    EmbeddingSourceConfig,
    ImageEncoderConfig,
    TextConfig,
    TextTowerConfig,
)
from mmfm.convert import Converted, register_converter
from mmfm.convert.io import read_state_dict
from mmfm.convert.keys import check_shapes, rename, resample_pos_embed
from mmfm.encoders.text_tower import TextTower
from mmfm.encoders.vision import ImageEncoder
from mmfm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

TOWERS = ("image", "text")
IMAGE_PREFIX = "encoders.image.vit."
TEXT_PREFIX = "towers.text."
LOGIT_SCALE = "heads.contrastive.logit_scale"
# Files of an open_clip hub directory, preferred first.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CONFIG_FILE = "open_clip_config.json"
CLIP_VOCAB_SIZE = 49408
ZERO_SHOT_TEMPLATES = ["a photo of a {}."]

_BLOCK = {
    "ln_1.{}": "norm1.{}",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.{}": "attn.proj.{}",
    "ln_2.{}": "norm2.{}",
    "mlp.c_fc.{}": "mlp.fc1.{}",
    "mlp.c_proj.{}": "mlp.fc2.{}",
}


def _block_map(source: str, target: str) -> dict[str, str]:
    """Template entries for every block tensor: `{source}.{i}.ln_1.weight` -> `{target}.{i}.norm1.weight`, ..."""
    out = {}
    for src, dst in _BLOCK.items():
        for param in ("weight", "bias") if "{}" in src else (None,):
            out[f"{source}.{{}}." + src.format(param)] = f"{target}.{{}}." + dst.format(param)
    return out


# open_clip key (after the tower's prefix) -> mmfm key (under the tower's prefix). Tensors that change shape are
# reshaped in `_image_state` / `_text_state`.
IMAGE_MAP = {
    "conv1.weight": "patch_embed.proj.weight",
    "class_embedding": "cls_token",  # (W,) -> (1, 1, W)
    "positional_embedding": "pos_embed",  # (N, W) -> (1, N, W)
    "ln_pre.weight": "norm_pre.weight",
    "ln_pre.bias": "norm_pre.bias",
    **_block_map("transformer.resblocks", "blocks"),
    "ln_post.weight": "norm.weight",
    "ln_post.bias": "norm.bias",
    "proj": "head.weight",  # (W, E) -> (E, W)
}
TEXT_MAP = {
    "token_embedding.weight": "token_embed.weight",
    "positional_embedding": "pos_embed",
    **_block_map("transformer.resblocks", "blocks"),
    "ln_final.weight": "norm.weight",
    "ln_final.bias": "norm.bias",
    "text_projection": "proj.weight",  # (W, E) -> (E, W)
}
# Top-level keys of open_clip's CLIP (not CustomTextCLIP) that belong to the text tower.
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# Entries that are no weights: the causal mask buffer, and the sizes OpenAI's checkpoints store as tensors.
_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")

# CLIPVisionCfg / CLIPTextCfg fields mmfm models; any other field must keep open_clip's default.
_VISION_FIELDS = frozenset(
    "layers width head_width mlp_ratio patch_size image_size patch_dropout output_tokens".split()
)
_TEXT_FIELDS = frozenset(
    "context_length vocab_size width heads layers mlp_ratio pad_id eos_id proj_type output_tokens "
    "hf_model_pretrained hf_proj_type hf_pooler_type".split()  # the hf_* fields only matter with hf_model_name
)
_MODEL_FIELDS = frozenset(
    "embed_dim vision_cfg text_cfg quick_gelu custom_text cast_dtype init_logit_scale preprocess_cfg "
    "nonscalar_logit_scale".split()
)


@register_converter("open_clip")
def convert_open_clip(
    path: str | Path,
    model_name: str | None = None,
    towers: Sequence[str] = TOWERS,
    pretrained: str | None = None,
    img_size: int | None = None,
) -> Converted:
    """Reads an open_clip checkpoint as mmfm image and/or text towers with a contrastive head.

    Args:
        path: a weights file (`.safetensors`, or `.bin`/`.pt` read with `weights_only=True`) or an open_clip hub
            directory (open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin).
        model_name: the open_clip architecture (`open_clip.list_models()`, e.g. "ViT-B-32") or the path of a model
            config JSON; optional for a directory whose open_clip_config.json describes the model (it wins).
        towers: which towers to convert: "image", "text" or both (a sequence, or one name).
        pretrained: an open_clip pretrained tag of `model_name` whose preprocessing (mean, std, interpolation)
            to use; default: the directory's preprocess_cfg, else OpenAI CLIP's.
        img_size: the image encoder's input size; None keeps the checkpoint's, another resamples the position
            embedding.

    Returns:
        {"image": ..., "text": ..., "contrastive": ...} (the converted towers' parts) and the weights under
        `encoders.image.vit.`, `towers.text.` and `heads.contrastive.logit_scale`.

    Raises:
        ConfigError: an unknown tower or architecture name, or architecture features mmfm does not model.
        CheckpointError: the file is unreadable, lacks a requested tower, or does not fit the architecture.
    """
    towers = (towers,) if isinstance(towers, str) else tuple(towers)
    unknown = [t for t in towers if t not in TOWERS]
    if unknown or not towers:
        raise ConfigError(f"open_clip towers must be some of {', '.join(TOWERS)}; got {list(towers)}")
    path = Path(path)
    state, source, model_cfg, preprocess = _read(path, model_name)
    if pretrained is not None:
        preprocess = {**preprocess, **_pretrained_preprocess(model_name, pretrained)}
    vision, text, embed_dim, quick_gelu = _parse_model_cfg(model_cfg, source)

    parts = _split(state, source)
    missing = [t for t in towers if not parts[t]]
    if missing:
        present = [t for t in TOWERS if parts[t]] or ["none"]
        raise CheckpointError(
            f"{source}: no {' or '.join(missing)} tower in this checkpoint (asked for {', '.join(towers)}; "
            f"it has: {', '.join(present)})"
        )
    config: dict[str, Any] = {}
    out: dict[str, Tensor] = {}
    if "image" in towers:
        config["image"] = _image_config(vision, embed_dim, quick_gelu, preprocess, img_size, source)
        out.update(_image_state(parts["image"], config["image"], source))
    if "text" in towers:
        config["text"] = _text_config(text, embed_dim, quick_gelu)
        out.update(_text_state(parts["text"], config["text"].tower, source))
    out_dim = config["text"].tower.out_dim if "text" in towers else embed_dim
    config["contrastive"] = ContrastiveHeadConfig(
        embed_dim=out_dim,
        templates=list(ZERO_SHOT_TEMPLATES),
        source=EmbeddingSourceConfig(
            text="tower" if "text" in towers else "backbone", image="tower" if "image" in towers else "backbone"
        ),
    )
    if "logit_scale" in state:
        out[LOGIT_SCALE] = state["logit_scale"].reshape(1)  # mmfm keeps it (1,), as open_clip's nonscalar_logit_scale
    return Converted(config, out)


def _read(path: Path, model_name: str | None) -> tuple[dict[str, Tensor], str, dict[str, Any], dict[str, Any]]:
    """Weights, their file, the model config and preprocessing of a checkpoint file or hub directory."""
    model_cfg, preprocess = None, {}
    if path.is_dir():
        weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no open_clip weights here (looked for {', '.join(WEIGHT_FILES)})")
        if (path / CONFIG_FILE).is_file():
            hub = _read_json(path / CONFIG_FILE)
            model_cfg, preprocess = hub.get("model_cfg"), dict(hub.get("preprocess_cfg") or {})
    else:
        weights = path
    if model_cfg is None:
        if model_name is None:
            raise ConfigError(f"{path}: converting an open_clip weights file needs model_name (e.g. 'ViT-B-32')")
        model_cfg = _model_config(model_name)
    preprocess = {**(model_cfg.get("preprocess_cfg") or {}), **preprocess}
    return read_state_dict(weights), str(weights), model_cfg, preprocess


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _model_config(model_name: str) -> dict[str, Any]:
    """open_clip's architecture config of a name, or of a JSON file (a model config or an open_clip_config.json)."""
    if model_name.endswith(".json"):
        data = _read_json(Path(model_name))
        return data.get("model_cfg", data)
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"{model_name!r} is not an open_clip architecture (see open_clip.list_models()){hint}")
    return config


def _pretrained_preprocess(model_name: str | None, tag: str) -> dict[str, Any]:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name or "", tag)
    if not cfg:
        raise ConfigError(f"open_clip has no pretrained tag {tag!r} for {model_name!r}")
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}


def _parse_model_cfg(cfg: dict[str, Any], source: str) -> tuple[CLIPVisionCfg, CLIPTextCfg, int, bool]:
    """open_clip's config dict -> its vision and text dataclasses; refuses what mmfm's towers cannot be."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    problems = [f"{k}={v!r}" for k, v in cfg.items() if k not in _MODEL_FIELDS and v]
    try:
        vision = CLIPVisionCfg(**cfg.get("vision_cfg", {}))
        text = CLIPTextCfg(**cfg.get("text_cfg", {}))
    except TypeError as e:
        raise ConfigError(f"{source}: not an open_clip model config ({e})") from None
    problems += _non_default(vision, CLIPVisionCfg(), _VISION_FIELDS, "vision_cfg")
    problems += _non_default(text, CLIPTextCfg(), _TEXT_FIELDS, "text_cfg")
    if not isinstance(vision.layers, int):
        problems.append(f"vision_cfg.layers={vision.layers!r} (a ResNet)")
    if text.vocab_size != CLIP_VOCAB_SIZE:
        problems.append(f"text_cfg.vocab_size={text.vocab_size} (mmfm's CLIP tokenizer has {CLIP_VOCAB_SIZE} ids)")
    if text.proj_type not in ("linear", "none"):
        problems.append(f"text_cfg.proj_type={text.proj_type!r}")
    if problems:
        raise ConfigError(
            f"{source}: open_clip features mmfm's towers do not model: {', '.join(problems)} (mmfm converts "
            "CLIP ViTs with open_clip's own text transformer)"
        )
    return vision, text, cfg["embed_dim"], bool(cfg.get("quick_gelu", False))


def _non_default(cfg: Any, default: Any, supported: frozenset[str], section: str) -> list[str]:
    return [
        f"{section}.{f.name}={getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if f.name not in supported and getattr(cfg, f.name) != getattr(default, f.name)
    ]


def _split(state: dict[str, Tensor], source: str) -> dict[str, dict[str, Tensor]]:
    """The checkpoint's tensors by tower, prefixes removed; anything that is neither tower is an error."""
    text_prefix = "text." if "text.token_embedding.weight" in state else ""
    parts: dict[str, dict[str, Tensor]] = {"image": {}, "text": {}}
    others = []
    for key, tensor in state.items():
        if key.startswith("visual."):
            parts["image"][key.removeprefix("visual.")] = tensor
        elif text_prefix and key.startswith(text_prefix) or not text_prefix and key.startswith(_TEXT_TOP_LEVEL):
            parts["text"][key.removeprefix(text_prefix)] = tensor
        elif key not in ("logit_scale", *_IGNORED):
            others.append(key)
    if others:
        hint = " (SigLIP's logit bias is not modelled)" if "logit_bias" in others else ""
        raise CheckpointError(f"{source}: keys of neither CLIP tower: {', '.join(sorted(others)[:20])}{hint}")
    for part in parts.values():
        for key in _IGNORED:
            part.pop(key, None)
    return parts


def _image_config(
    vision: CLIPVisionCfg,
    embed_dim: int,
    quick_gelu: bool,
    preprocess: dict[str, Any],
    img_size: int | None,
    source: str,
) -> ImageEncoderConfig:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    if not isinstance(vision.image_size, int) and len(set(vision.image_size)) != 1:
        raise ConfigError(f"{source}: vision_cfg.image_size={vision.image_size!r} is not square")
    if preprocess.get("resize_mode", "shortest") != "shortest":
        raise ConfigError(
            f"{source}: preprocess resize_mode={preprocess['resize_mode']!r}; mmfm resizes the shortest side and "
            "centre-crops (open_clip's 'shortest')"
        )
    return ImageEncoderConfig(
        model_name="vit_base_patch16_clip_quickgelu_224" if quick_gelu else "vit_base_patch16_clip_224",
        img_size=img_size or size,
        patch_size=vision.patch_size,
        width=vision.width,
        depth=vision.layers,
        num_heads=vision.width // vision.head_width,
        mlp_ratio=vision.mlp_ratio,
        pre_norm=True,
        global_pool="token",
        head_dim=embed_dim,
        head_bias=False,
        mean=tuple(preprocess.get("mean", OPENAI_DATASET_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_DATASET_STD)),
        crop_pct=1.0,  # open_clip resizes the shortest side to the input size, then centre-crops
        interpolation=preprocess.get("interpolation", "bicubic"),
    )


def _text_config(text: CLIPTextCfg, embed_dim: int, quick_gelu: bool) -> TextConfig:
    tower = TextTowerConfig(
        kind="clip",
        vocab_size=text.vocab_size,
        context_length=text.context_length,
        width=text.width,
        depth=text.layers,
        num_heads=text.heads,
        mlp_dim=int(text.width * text.mlp_ratio),
        act="quick_gelu" if quick_gelu else "gelu",
        norm_eps=1e-5,
        pooling="eot",
        embed_dim=None if text.proj_type == "none" else embed_dim,
    )
    return TextConfig(tokenizer="clip", max_length=text.context_length, tower=tower)


def _image_state(part: dict[str, Tensor], config: ImageEncoderConfig, source: str) -> dict[str, Tensor]:
    state = rename(part, IMAGE_MAP, source)
    state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    state["head.weight"] = state["head.weight"].T.contiguous()
    state["pos_embed"] = resample_pos_embed(
        state["pos_embed"].unsqueeze(0), config.img_size // config.patch_size, 1, source
    )
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ImageEncoder(config).vit.state_dict().items()}
    what = f"an image tower of width {config.width}, depth {config.depth}, patch {config.patch_size}, embed_dim "
    check_shapes(expected, state, source, what + str(config.head_dim))
    return {IMAGE_PREFIX + k: v for k, v in state.items()}


def _text_state(part: dict[str, Tensor], config: TextTowerConfig, source: str) -> dict[str, Tensor]:
    state = rename(part, TEXT_MAP, source)
    if "proj.weight" in state:
        state["proj.weight"] = state["proj.weight"].T.contiguous()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TextTower(config).state_dict().items()}
    what = f"a text tower of width {config.width}, depth {config.depth}, context {config.context_length}, embed_dim "
    check_shapes(expected, state, source, what + str(config.embed_dim))
    return {TEXT_PREFIX + k: v for k, v in state.items()}
