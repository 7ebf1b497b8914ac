"""Dataclass configs for every component, nested in one `ModelConfig` that round-trips through YAML.

A YAML file is either a full config (as written beside every checkpoint) or a recipe that names a
registered preset and overrides some of its fields:

```yaml
preset: mmfm-tiny
backbone:
  depth: 6
```

Unknown keys, wrong types and impossible combinations raise `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmfm.errors import ConfigError

MEDIA_MODALITIES = ("image", "audio")
MODALITIES = (*MEDIA_MODALITIES, "text")


@dataclass
class ProjectorConfig:
    """Maps one modality's encoder tokens into the backbone's token space.

    Attributes:
        kind: "linear", or "mlp" (Linear -> GELU -> Linear).
        num_tokens: pool the encoder tokens down to this many with learned-query attention; 0 keeps them all.
    """

    kind: Literal["linear", "mlp"] = "mlp"
    num_tokens: int = 0


@dataclass
class ImageEncoderConfig:
    """A timm ViT-family image encoder and its preprocessing.

    Fields left at None take the value of `model_name`'s own timm config (architecture) or pretrained
    config (preprocessing), so `model_name` alone describes a standard model.

    Attributes:
        model_name: any timm ViT-family name, e.g. "vit_base_patch16_224" or "deit_small_patch16_224".
        img_size: square input resolution.
        patch_size: patch side in pixels.
        width: token width (timm's embed_dim).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        in_chans: input channels; images are converted to RGB for 3 and to L for 1.
        class_token: whether the ViT has a class token.
        reg_tokens: number of register tokens.
        keep_prefix_tokens: hand class/register tokens to the projector too (False drops them).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        crop_pct: centre-crop fraction; the image is resized to img_size / crop_pct first.
        interpolation: resize interpolation ("bicubic", "bilinear", ...).
        projector: how the tokens enter the shared token space.
    """

    model_name: str = "vit_base_patch16_224"
    img_size: int | None = None
    patch_size: int | None = None
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    in_chans: int = 3
    class_token: bool = True
    reg_tokens: int = 0
    keep_prefix_tokens: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class AudioEncoderConfig:
    """An AST-style spectrogram ViT and its waveform front-end.

    The defaults are AST's (AudioSet): 16 kHz mono, 128-bin kaldi fbank with a 25 ms Hanning window every
    10 ms, 1024 frames, normalised as (fbank - norm_mean) / (2 * norm_std), 16x16 patches every 10 bins/frames.

    Attributes:
        model_name: timm ViT-family name whose block layout is used (in_chans is always 1).
        sample_rate: rate the waveform is resampled to, in Hz.
        num_mel_bins: mel filterbank channels (the spectrogram's height).
        target_frames: frames every clip is padded or cropped to (the spectrogram's width).
        frame_length_ms: analysis window length.
        frame_shift_ms: hop between frames.
        window: kaldi window type ("hanning", "hamming", "povey", "rectangular", "blackman").
        dither: kaldi dither amount; 0 makes features deterministic.
        norm_mean: subtracted from the log-mel features.
        norm_std: features are divided by 2 * norm_std, as AST does.
        pad_mode: how clips shorter than target_frames are filled: "zeros" (after the clip) or "repeat" (tile it).
        crop: which part of a longer clip is kept: "start" or "center".
        patch_size: square patch side over (mel, frames).
        patch_stride: stride between patches; below patch_size gives AST's overlapping patches.
        width: token width (timm's embed_dim).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        class_token: whether the ViT has a class token.
        reg_tokens: number of register (AST: distillation) tokens.
        keep_prefix_tokens: hand class/register tokens to the projector too (False drops them).
        projector: how the tokens enter the shared token space.
    """

    model_name: str = "vit_base_patch16_224"
    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 1024
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window: Literal["hanning", "hamming", "povey", "rectangular", "blackman"] = "hanning"
    dither: float = 0.0
    norm_mean: float = -4.2677393
    norm_std: float = 4.5689974
    pad_mode: Literal["zeros", "repeat"] = "zeros"
    crop: Literal["start", "center"] = "start"
    patch_size: int = 16
    patch_stride: int = 10
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    class_token: bool = True
    reg_tokens: int = 0
    keep_prefix_tokens: bool = False
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)


@dataclass
class TextConfig:
    """Tokenizer and text length policy.

    Attributes:
        tokenizer: "clip" (open_clip's CLIP BPE, shipped with open_clip, works offline) or "byte" (UTF-8 bytes).
        max_length: most tokens per text, BOS and EOS included; longer texts lose tokens from the end, EOS kept.
    """

    tokenizer: Literal["clip", "byte"] = "clip"
    max_length: int = 77


@dataclass
class BackboneConfig:
    """The one decoder transformer over the mixed token sequence.

    Attributes:
        dim: token width of the shared space.
        depth: number of blocks.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); None means num_heads.
        hidden_dim: SwiGLU hidden width; None means 8/3 * dim rounded up to a multiple of 64.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        max_seq_len: longest sequence (media tokens + text) the RoPE tables cover.
        dropout: dropout on attention and MLP outputs during training.
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None
    hidden_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    dropout: float = 0.0
    grad_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        return -(-(8 * self.dim // 3) // 64) * 64


@dataclass
class CaptionHeadConfig:
    """Text generation from the backbone: an LM head tied to the text embedding.

    Attributes:
        max_new_tokens: default generation length.
    """

    max_new_tokens: int = 32


@dataclass
class ClassifyHeadConfig:
    """A trained classifier over a media segment.

    Attributes:
        labels: class names, in logit order.
        pool: "mean" over the segment's tokens, or "query" (a learned query attends over them).
        multi_label: independent sigmoid per class (audio tagging) instead of a softmax.
    """

    labels: list[str] = field(default_factory=list)
    pool: Literal["mean", "query"] = "mean"
    multi_label: bool = False


@dataclass
class ContrastiveHeadConfig:
    """Unit embeddings per modality for retrieval and zero-shot classification.

    Attributes:
        embed_dim: embedding width.
        init_temperature: initial softmax temperature of the InfoNCE logits (learned unless frozen).
        learn_temperature: whether the temperature is trained.
        templates: zero-shot prompt templates; each "{}" is replaced by a label and the embeddings averaged.
    """

    embed_dim: int = 512
    init_temperature: float = 0.07
    learn_temperature: bool = True
    templates: list[str] = field(default_factory=lambda: ["{}"])


@dataclass
class ModelConfig:
    """A whole mmfm model. A modality or head set to None is absent."""

    name: str = "custom"
    image: ImageEncoderConfig | None = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig | None = field(default_factory=AudioEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    caption: CaptionHeadConfig | None = field(default_factory=CaptionHeadConfig)
    classify: ClassifyHeadConfig | None = None
    contrastive: ContrastiveHeadConfig | None = field(default_factory=ContrastiveHeadConfig)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m == "text" or getattr(self, m) is not None)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Builds and validates a config; errors name `source` (a file path, say) and the offending key."""
        config = build_dataclass(cls, data, source, prefix="")
        validate(config, source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Reads a full config or a preset recipe (a `preset:` key plus overrides) from YAML."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
        if "preset" in data:
            from mmfm.registry import get_preset

            data = dict(data)
            base = get_preset(data.pop("preset")).to_dict()
            data = merge(base, data)
        return cls.from_dict(data, str(path))

    def with_overrides(self, overrides: dict[str, Any], source: str = "<overrides>") -> ModelConfig:
        """A new config with nested (`{"backbone": {"depth": 2}}`) or dotted (`{"backbone.depth": 2}`) overrides."""
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            *parents, leaf = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return ModelConfig.from_dict(merge(self.to_dict(), nested), source)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges `override` into a copy of `base`; a None or non-dict value replaces the whole entry."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(config: ModelConfig, source: str = "<config>") -> None:
    """Rejects combinations that cannot build a model, naming the keys involved."""
    bb = config.backbone

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    for key in ("dim", "depth", "num_heads", "max_seq_len"):
        if getattr(bb, key) <= 0:
            fail(f"backbone.{key} must be positive, got {getattr(bb, key)}")
    if bb.dim % bb.num_heads:
        fail(f"backbone.num_heads ({bb.num_heads}) must divide backbone.dim ({bb.dim})")
    if bb.num_heads % bb.kv_heads:
        fail(f"backbone.num_kv_heads ({bb.kv_heads}) must divide backbone.num_heads ({bb.num_heads})")
    if bb.head_dim % 2:
        fail(f"backbone.dim / backbone.num_heads = {bb.head_dim} must be even for rotary embeddings")
    if not 0.0 <= bb.dropout < 1.0:
        fail(f"backbone.dropout must be in [0, 1), got {bb.dropout}")
    if config.text.max_length < 2:
        fail(f"text.max_length must leave room for BOS and EOS, got {config.text.max_length}")
    if config.text.max_length > bb.max_seq_len:
        fail(f"text.max_length ({config.text.max_length}) exceeds backbone.max_seq_len ({bb.max_seq_len})")
    for name in MEDIA_MODALITIES:
        media = getattr(config, name)
        if media is not None and media.projector.num_tokens < 0:
            fail(f"{name}.projector.num_tokens must be >= 0, got {media.projector.num_tokens}")
    audio = config.audio
    if audio is not None:
        if audio.sample_rate <= 0:
            fail(f"audio.sample_rate must be positive, got {audio.sample_rate}")
        if not 0 < audio.patch_stride <= audio.patch_size:
            fail(f"audio.patch_stride must be in [1, patch_size={audio.patch_size}], got {audio.patch_stride}")
        if audio.num_mel_bins < audio.patch_size or audio.target_frames < audio.patch_size:
            fail(
                f"audio.num_mel_bins ({audio.num_mel_bins}) and audio.target_frames ({audio.target_frames}) "
                f"must be at least audio.patch_size ({audio.patch_size})"
            )
    if config.classify is not None:
        if not config.classify.labels:
            fail("classify.labels must name at least one class")
        if len(set(config.classify.labels)) != len(config.classify.labels):
            fail("classify.labels has duplicates")
        if config.image is None and config.audio is None:
            fail("classify needs an image or audio encoder to classify")
    if config.contrastive is not None:
        if config.contrastive.embed_dim <= 0:
            fail(f"contrastive.embed_dim must be positive, got {config.contrastive.embed_dim}")
        if config.contrastive.init_temperature <= 0:
            fail(f"contrastive.init_temperature must be positive, got {config.contrastive.init_temperature}")
        if not all("{}" in t for t in config.contrastive.templates) or not config.contrastive.templates:
            fail('contrastive.templates must be a non-empty list of strings that each contain "{}"')


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def build_dataclass(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, coercing YAML types; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{prefix}{key}'{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, source, prefix + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{source}: '{key}' may not be null")
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, source, key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        items = [_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value
