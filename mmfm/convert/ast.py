"""Audio Spectrogram Transformer (transformers' `ASTModel`) -> the mmfm audio encoder.

A Hugging Face AST directory (`config.json`, `model.safetensors` or `pytorch_model.bin`, and usually
`preprocessor_config.json`) becomes an `audio` config with AST's feature settings and the weights of
`encoders.audio.vit`, a timm ViT with AST's geometry:

    embeddings.cls_token / distillation_token       -> cls_token / reg_token (the distillation token is
                                                       mmfm's one register token: reg_tokens=1)
    embeddings.position_embeddings                  -> pos_embed (prefix rows first, as timm's layout;
                                                       the patch grid resampled if target_frames changes)
    embeddings.patch_embeddings.projection          -> patch_embed.proj (same (mel, frames) orientation)
    layers.{i}.attention.{q,k,v}_proj               -> blocks.{i}.attn.qkv (concatenated q, k, v)
    layers.{i}.attention.o_proj / mlp.fc1 / fc2     -> blocks.{i}.attn.proj / mlp.fc1 / mlp.fc2
    layers.{i}.layernorm_before / layernorm_after   -> blocks.{i}.norm1 / norm2
    layernorm                                       -> norm

Both transformers 5 names (above) and the earlier ones the published checkpoints use
(`encoder.layer.{i}.attention.attention.query`, ...) are read, with or without the
`audio_spectrogram_transformer.` prefix of `ASTForAudioClassification`, whose AudioSet classifier
(`classifier.*`) is dropped: mmfm's classify head reads backbone states, not the audio tower's.

mmfm's tokens with `keep_prefix_tokens=True` equal `ASTModel(...).last_hidden_state` ([cls, distillation,
patches]); with the default `False`, the patch tokens `last_hidden_state[:, 2:]`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmfm.convert import Converted, register_converter
from mmfm.convert.io import read_hf_state_dict
from mmfm.errors import CheckpointError

MODEL_TYPE = "audio-spectrogram-transformer"
HF_CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
PREFIX = "encoders.audio.vit."
NUM_PREFIX_TOKENS = 2  # class + distillation

# Source key (transformers 5 names) -> timm key; "{}" is the layer index.
_TEMPLATES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layers.{}.layernorm_before.weight": "blocks.{}.norm1.weight",
    "layers.{}.layernorm_before.bias": "blocks.{}.norm1.bias",
    "layers.{}.attention.o_proj.weight": "blocks.{}.attn.proj.weight",
    "layers.{}.attention.o_proj.bias": "blocks.{}.attn.proj.bias",
    "layers.{}.layernorm_after.weight": "blocks.{}.norm2.weight",
    "layers.{}.layernorm_after.bias": "blocks.{}.norm2.bias",
    "layers.{}.mlp.fc1.weight": "blocks.{}.mlp.fc1.weight",
    "layers.{}.mlp.fc1.bias": "blocks.{}.mlp.fc1.bias",
    "layers.{}.mlp.fc2.weight": "blocks.{}.mlp.fc2.weight",
    "layers.{}.mlp.fc2.bias": "blocks.{}.mlp.fc2.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Names before transformers 5 (every published AST checkpoint) -> transformers 5 names.
_LEGACY = {
    "encoder.layer.{}.attention.attention.query.": "layers.{}.attention.q_proj.",
    "encoder.layer.{}.attention.attention.key.": "layers.{}.attention.k_proj.",
    "encoder.layer.{}.attention.attention.value.": "layers.{}.attention.v_proj.",
    "encoder.layer.{}.attention.output.dense.": "layers.{}.attention.o_proj.",
    "encoder.layer.{}.intermediate.dense.": "layers.{}.mlp.fc1.",
    "encoder.layer.{}.output.dense.": "layers.{}.mlp.fc2.",
    "encoder.layer.{}.layernorm_before.": "layers.{}.layernorm_before.",
    "encoder.layer.{}.layernorm_after.": "layers.{}.layernorm_after.",
}
_QKV = re.compile(r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
_WRAPPER_PREFIX = "audio_spectrogram_transformer."
_HEAD_PREFIX = "classifier."


@register_converter("ast", hf_model_types=(MODEL_TYPE,))
def convert_ast(path: str | Path, target_frames: int | None = None) -> Converted:
    """Converts a Hugging Face AST directory (`ASTModel` or `ASTForAudioClassification`) to mmfm.

    Args:
        path: the directory `save_pretrained` wrote (config.json + weights; preprocessor_config.json is read
            when present, else `ASTFeatureExtractor`'s defaults apply).
        target_frames: frames per clip, when it should differ from AST's `max_length`; the position embedding's
            time axis is then resampled bilinearly.

    Returns:
        `config = {"audio": {...}}`, the audio encoder fields AST determines (merge them over a preset with
        `mmfm.convert.build_config`), and the weights under `encoders.audio.vit.*`.

    Raises:
        CheckpointError: the directory is not an AST checkpoint (naming the model type found), uses settings
            the mmfm encoder cannot express, or its weights miss or add keys (listed together).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: an AST checkpoint is a directory ({HF_CONFIG_NAME} + weights)")
    hf = _read_json(directory / HF_CONFIG_NAME, required=True)
    preprocessor = _read_json(directory / PREPROCESSOR_NAME, required=False)
    audio = ast_audio_config(hf, preprocessor, source=str(directory), target_frames=target_frames)
    state, weights_file = read_hf_state_dict(directory)
    return Converted({"audio": audio}, convert_ast_state_dict(state, hf, audio["target_frames"], str(weights_file)))


def ast_audio_config(
    hf: dict[str, Any], preprocessor: dict[str, Any] | None, source: str, target_frames: int | None = None
) -> dict[str, Any]:
    """`AudioEncoderConfig` fields from an AST `config.json` and `preprocessor_config.json` (as dicts).

    The front-end is `ASTFeatureExtractor`'s: kaldi fbank with a 25 ms Hanning window every 10 ms, no dither,
    zero padding after the clip, and `(fbank - mean) / (2 * std)` (without `do_normalize`, mean 0 and std 0.5
    leave the features unchanged).
    """

    def get(key: str, default: Any = None) -> Any:
        if key not in hf and default is None:
            raise CheckpointError(f"{source}/{HF_CONFIG_NAME}: no '{key}' in this AST config")
        return hf.get(key, default)

    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise CheckpointError(
            f"{source}/{HF_CONFIG_NAME}: model_type is {model_type!r}, not {MODEL_TYPE!r}: not an AST checkpoint"
        )
    patch = get("patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) and len(set(patch)) == 1 else patch
    strides = (get("frequency_stride", 10), get("time_stride", 10))
    width, heads = get("hidden_size"), get("num_attention_heads")
    intermediate, act = get("intermediate_size", 4 * width), get("hidden_act", "gelu")
    unsupported = [
        (not isinstance(patch, int), f"patch_size {patch} (not square)"),
        (strides[0] != strides[1], f"frequency_stride ({strides[0]}) != time_stride ({strides[1]})"),
        (intermediate != 4 * width, f"intermediate_size ({intermediate}) != 4 * hidden_size"),
        (act != "gelu", f"hidden_act {act!r} (only 'gelu')"),
        (not get("qkv_bias", True), "qkv_bias false"),
    ]
    problems = [what for bad, what in unsupported if bad]
    if problems:
        raise CheckpointError(
            f"{source}/{HF_CONFIG_NAME}: AST settings the mmfm audio encoder cannot express: {', '.join(problems)}"
        )
    pre = preprocessor or {}
    max_length = get("max_length", 1024)
    num_mel_bins = get("num_mel_bins", 128)
    for key, model_value in (("num_mel_bins", num_mel_bins), ("max_length", max_length)):
        if pre.get(key, model_value) != model_value:
            raise CheckpointError(
                f"{source}/{PREPROCESSOR_NAME}: {key}={pre[key]} disagrees with {HF_CONFIG_NAME}'s {model_value}"
            )
    normalise = pre.get("do_normalize", True)
    frames = max_length if target_frames is None else target_frames
    if frames < patch:
        raise CheckpointError(f"{source}: target_frames ({frames}) must be at least the patch size ({patch})")
    return {
        "model_name": "vit_base_patch16_224",  # the block layout; width, depth and heads below override its sizes
        "sample_rate": pre.get("sampling_rate", 16000),
        "num_mel_bins": num_mel_bins,
        "target_frames": frames,
        "frame_length_ms": 25.0,
        "frame_shift_ms": 10.0,
        "window": "hanning",
        "dither": 0.0,
        "norm_mean": float(pre.get("mean", -4.2677393)) if normalise else 0.0,
        "norm_std": float(pre.get("std", 4.5689974)) if normalise else 0.5,
        "pad_mode": "zeros",
        "crop": "start",
        "patch_size": patch,
        "patch_stride": strides[0],
        "width": width,
        "depth": get("num_hidden_layers"),
        "num_heads": heads,
        "norm_eps": float(get("layer_norm_eps", 1e-12)),
        "class_token": True,
        "reg_tokens": 1,
    }


def convert_ast_state_dict(
    state: dict[str, Tensor], hf: dict[str, Any], target_frames: int | None = None, source: str = "<state dict>"
) -> dict[str, Tensor]:
    """Remaps an AST state dict to mmfm keys (`encoders.audio.vit.*`): the pure key map, with q/k/v fused.

    Args:
        state: `ASTModel` or `ASTForAudioClassification` weights, transformers 5 or earlier names.
        hf: the checkpoint's config.json, for the patch grid.
        target_frames: resample the position embedding's time axis to this many frames (None: keep).
        source: named in errors.

    Raises:
        CheckpointError: listing missing and unexpected AST keys together.
    """
    state = _canonical_names(state)
    patterns = [(re.compile(re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), dst) for src, dst in _TEMPLATES.items()]
    depth = hf.get("num_hidden_layers", 0)
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, tensor in state.items():
        if key == "embeddings.position_embeddings" or _QKV.fullmatch(key):
            continue  # surgery below
        for pattern, dst in patterns:
            match = pattern.match(key)
            if match:
                out[PREFIX + dst.replace("{}", match.group(1) if match.groups() else "")] = tensor
                break
        else:
            unexpected.append(key)
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = [state.get(f"layers.{i}.attention.{p}_proj.{kind}") for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"{PREFIX}blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # (3 * D, ...) as q, k, v
    unexpected += [k for k in state if (m := _QKV.fullmatch(k)) and int(m.group(1)) >= depth]
    if "embeddings.position_embeddings" in state:
        out[PREFIX + "pos_embed"] = _fit_pos_embed(state["embeddings.position_embeddings"], hf, target_frames)
    templates = ["pos_embed", "blocks.{}.attn.qkv.weight", "blocks.{}.attn.qkv.bias", *_TEMPLATES.values()]
    expected = {PREFIX + t.replace("{}", str(i)) for t in templates for i in range(max(depth, 1))}
    missing = sorted(expected - set(out))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(
                f"missing mmfm keys ({len(missing)}): " + ", ".join(k.removeprefix(PREFIX) for k in missing)
            )
        if unexpected:
            problems.append(f"unexpected AST keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
        raise CheckpointError(
            f"{source}: these weights are not an AST model of the configured shape (another architecture?)\n  "
            + "\n  ".join(problems)
        )
    return out


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Bilinearly resizes the patch part of a (1, prefix + H * W, D) position embedding to `new_grid`.

    The two prefix rows (class, distillation) are kept as they are. The grid is (mel, frames), row-major, as the
    patch embedding flattens it; `align_corners=False`, no antialiasing.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :NUM_PREFIX_TOKENS], pos_embed[:, NUM_PREFIX_TOKENS:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bilinear", align_corners=False).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # (1, H' * W', D)
    return torch.cat([prefix, grid], dim=1)


def _fit_pos_embed(pos_embed: Tensor, hf: dict[str, Any], target_frames: int | None) -> Tensor:
    patch = hf.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    fs, ts = hf.get("frequency_stride", 10), hf.get("time_stride", 10)
    mel, frames = hf.get("num_mel_bins", 128), hf.get("max_length", 1024)

    def grid(num_frames: int) -> tuple[int, int]:
        return (mel - patch) // fs + 1, (num_frames - patch) // ts + 1

    return resample_pos_embed(pos_embed, grid(frames), grid(target_frames or frames))


def _canonical_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drops the classification wrapper and head, and renames pre-transformers-5 keys to the current names."""
    legacy = [(re.compile(re.escape(src).replace(r"\{\}", r"(\d+)")), dst) for src, dst in _LEGACY.items()]
    out = {}
    for key, tensor in state.items():
        key = key.removeprefix(_WRAPPER_PREFIX)
        if key.startswith(_HEAD_PREFIX):
            continue
        for pattern, dst in legacy:
            match = pattern.match(key)
            if match:
                key = dst.replace("{}", match.group(1)) + key[match.end() :]
                break
        out[key] = tensor
    return out


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path.parent}: no {path.name}; expected a Hugging Face AST directory")
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
