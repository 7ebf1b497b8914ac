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
import importlib
import math
import os
import re
import reprlib
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmfm.errors import ConfigError


def import_object(spec: str) -> Any:
    """The object a "package.module:name" string names, imported now: how the tables below stay cheap to import."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MediaSpec:
    """One media modality: its `ModelConfig` field is the table key; encoder and processor are imported lazily.

    Attributes:
        argument: the name of its inputs in the API and CLI (`images=`, `audio=`).
        encoder: "module:Class" of its encoder, built as `Class(modality_config)`.
        processor: "module:Class" turning raw items into a batch tensor, built from the encoder and config.
        extensions: file suffixes the CLI and manifests read as this modality.
    """

    argument: str
    encoder: str
    processor: str
    extensions: tuple[str, ...]


MEDIA: dict[str, MediaSpec] = {
    "image": MediaSpec(
        "images",
        "mmfm.encoders.vision:ImageEncoder",
        "mmfm.encoders.image_processor:ImageProcessor",
        (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    ),
    "audio": MediaSpec(
        "audio",
        "mmfm.encoders.audio:AudioEncoder",
        "mmfm.encoders.audio_processor:AudioProcessor",
        (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"),
    ),
}
MEDIA_MODALITIES = tuple(MEDIA)
MODALITIES = (*MEDIA_MODALITIES, "text")


@dataclass(frozen=True)
class HeadSpec:
    """One head: its config is the `ModelConfig` field named like the table key.

    Attributes:
        module: "module:Class" of the head, imported only when a model has it; built as `Class.build(model, config)`
            once the model's encoders, towers and backbone exist.
        objectives: training objectives the head serves: name (what a recipe's `objective:` says) ->
            "module:Class" of the objective.
    """

    module: str
    objectives: dict[str, str]


HEADS: dict[str, HeadSpec] = {
    "caption": HeadSpec(
        "mmfm.heads.caption:CaptionHead",
        {"caption": "mmfm.heads.caption:CaptionObjective", "chat": "mmfm.heads.caption:ChatObjective"},
    ),
    "classify": HeadSpec("mmfm.heads.classify:ClassifyHead", {"classify": "mmfm.heads.classify:ClassifyObjective"}),
    "contrastive": HeadSpec(
        "mmfm.heads.contrastive:ContrastiveHead", {"contrastive": "mmfm.heads.contrastive:ContrastiveObjective"}
    ),
    "image_gen": HeadSpec("mmfm.heads.image_gen:ImageGenHead", {"image_gen": "mmfm.heads.image_gen:ImageGenObjective"}),
}
# objective name -> the head that serves it
OBJECTIVE_HEADS: dict[str, str] = {objective: head for head, spec in HEADS.items() for objective in spec.objectives}


def objective_class(name: str) -> type:
    """The `mmfm.objective.Objective` subclass of a training objective named in `HEADS`, imported now."""
    return import_object(HEADS[OBJECTIVE_HEADS[name]].objectives[name])


# Samplers of the image_gen head: name -> (diffusers scheduler class, arguments beyond the shared noise schedule).
# No sampler clips its estimate of the clean image (see `mmfm.heads.image_gen_schedulers.make_scheduler`).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}
SchedulerName = Literal[tuple(SCHEDULERS)]
# Items `caption`, `classify` and `embed` put through the model at once, unless told otherwise.
DEFAULT_BATCH_SIZE = 32
# `mmfm serve`: the most chat requests decoded together, and how long a batch waits for more to join it. Eight HTTP
# requests sent at once reach the queue over 10-20 ms on 2 CPU cores (uvicorn's threads parse and decode them under
# the GIL): a 20 ms window gathers them into one batch; 5-10 ms split them in two.
DEFAULT_SERVE_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_MS = 20.0
# Parameter dtypes by the names the CLI and `mmfm.load(dtype=)` take (`mmfm.loader.DTYPES` maps them to torch's).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
Fail = Callable[[str], None]  # raises ConfigError with the message, prefixed by the config's source


def check_positive(component: Any, fail: Fail, key: str, names: tuple[str, ...]) -> None:
    """Fails naming the first of `names` that is set (not None) on `component` and not above 0."""
    for name in names:
        value = getattr(component, name)
        if value is not None and not value > 0:
            fail(f"{key}.{name} must be positive, got {value}")


# Limits on config and recipe files (the README's "Bad input" section); assign these attributes to change them.
# The most bytes a YAML config, recipe or override may have.
MAX_CONFIG_BYTES = 8 * 2**20
# The most units (one per value, plus one per character of text) a config may hold once its aliases are expanded.
MAX_CONFIG_SIZE = 8 * 2**20
# The most levels of lists and mappings inside each other.
MAX_CONFIG_DEPTH = 64
# Integers in a config are at most this large in magnitude (what a 64-bit integer holds).
MAX_CONFIG_INT = 2**63 - 1


@dataclass
class ProjectorConfig:
    """Maps one modality's encoder tokens into the backbone's token space.

    Attributes:
        kind: "linear", or "mlp" (Linear -> GELU -> Linear).
        num_tokens: pool the encoder tokens down to this many with learned-query attention; 0 keeps them all.
    """

    kind: Literal["linear", "mlp"] = "mlp"
    num_tokens: int = 0

    def check(self, fail: Fail, key: str) -> None:
        if self.num_tokens < 0:
            fail(f"{key}.num_tokens must be >= 0, got {self.num_tokens}")


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
        mlp_ratio: MLP hidden width over token width.
        pre_norm: a LayerNorm after the embeddings, before the blocks (CLIP's `ln_pre`; its patch embedding then
            has no bias, as in timm).
        in_chans: input channels; images are converted to RGB for 3 and to L for 1.
        class_token: whether the ViT has a class token.
        reg_tokens: number of register tokens.
        keep_prefix_tokens: hand class/register tokens to the projector too (False drops them).
        global_pool: how `ImageEncoder.forward_pooled` pools the tokens into one vector per image, the image
            embedding when `contrastive.source.image` is "tower": "token" (class token), "avg", "avgmax", "max" or
            "map" (attention pooling); timm's rules apply ("avg" moves the final norm after the pooling unless the
            named model says otherwise). None leaves the encoder without a pooled output ("token" for distilled
            DeiT).
        head_dim: width of a linear head after the pooling (CLIP's visual projection); 0 means no head.
        head_bias: whether that head has a bias (CLIP's projection has none).
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
    mlp_ratio: float | None = None
    pre_norm: bool | None = None
    in_chans: int = 3
    class_token: bool = True
    reg_tokens: int = 0
    keep_prefix_tokens: bool = False
    global_pool: Literal["token", "avg", "avgmax", "max", "map"] | None = None
    head_dim: int = 0
    head_bias: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def check(self, fail: Fail, key: str) -> None:
        self.projector.check(fail, f"{key}.projector")
        if self.head_dim < 0:
            fail(f"{key}.head_dim must be >= 0, got {self.head_dim}")
        check_positive(self, fail, key, ("img_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio"))
        check_positive(self, fail, key, ("crop_pct",))
        if self.in_chans not in (1, 3):
            fail(f"{key}.in_chans must be 3 (RGB) or 1 (greyscale), got {self.in_chans}")
        if self.reg_tokens < 0:
            fail(f"{key}.reg_tokens must be >= 0, got {self.reg_tokens}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and len(values) not in (1, self.in_chans):
                fail(f"{key}.{name} needs 1 or {key}.in_chans={self.in_chans} values, got {list(values)}")
        if self.std is not None and not all(v > 0 for v in self.std):
            fail(f"{key}.std values must be positive, got {self.std}")


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
        norm_eps: LayerNorm epsilon of the blocks and final norm; None keeps timm's (1e-6). Hugging Face's
            AST checkpoints use 1e-12.
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
    norm_eps: float | None = None
    class_token: bool = True
    reg_tokens: int = 0
    keep_prefix_tokens: bool = False
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def check(self, fail: Fail, key: str) -> None:
        self.projector.check(fail, f"{key}.projector")
        check_positive(self, fail, key, ("sample_rate", "frame_length_ms", "frame_shift_ms", "norm_std"))
        check_positive(self, fail, key, ("width", "depth", "num_heads", "norm_eps"))
        if self.dither < 0:
            fail(f"{key}.dither must be >= 0, got {self.dither}")
        if self.reg_tokens < 0:
            fail(f"{key}.reg_tokens must be >= 0, got {self.reg_tokens}")
        if not 0 < self.patch_stride <= self.patch_size:
            fail(f"{key}.patch_stride must be in [1, patch_size={self.patch_size}], got {self.patch_stride}")
        if self.num_mel_bins < self.patch_size or self.target_frames < self.patch_size:
            fail(
                f"{key}.num_mel_bins ({self.num_mel_bins}) and {key}.target_frames ({self.target_frames}) "
                f"must be at least {key}.patch_size ({self.patch_size})"
            )


@dataclass
class TextTowerConfig:
    """A pretrained-style text transformer that embeds a text on its own, outside the backbone.

    Dual-tower models (CLIP, sentence encoders) embed text with their own transformer; mmfm keeps that
    transformer as `towers.text` and uses its pooled output as the text embedding when
    `contrastive.source.text` is "tower". Built by `mmfm.encoders.text_tower.TextTower`.

    Attributes:
        kind: "clip" (pre-norm blocks, causal attention, a final LayerNorm: CLIP's text transformer) or "bert"
            (post-norm blocks, bidirectional attention over the real tokens, LayerNorm on the embeddings, token
            type embeddings: BERT and the sentence encoders built on it).
        vocab_size: rows of the token embedding; must equal the tokenizer's vocabulary size.
        context_length: learned positions; texts may have at most this many tokens.
        width: token width.
        depth: number of blocks.
        num_heads: attention heads per block; must divide width.
        mlp_dim: MLP hidden width; None means 4 * width.
        act: MLP activation: "gelu" (exact), "gelu_tanh" (tanh approximation) or "quick_gelu" (OpenAI CLIP's).
        norm_eps: LayerNorm epsilon (CLIP 1e-5, BERT 1e-12).
        type_vocab_size: token type embeddings ("bert" only; every token has type 0).
        pooling: one vector per text: "eot" (the last real token: CLIP's end-of-text), "cls" (the first token)
            or "mean" (the mean over real tokens: sentence-transformers' mean pooling).
        embed_dim: width of a bias-free linear projection after the pooling (CLIP's text projection); None
            means no projection, the embedding is the pooled token.
    """

    kind: Literal["clip", "bert"] = "clip"
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None
    act: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    norm_eps: float = 1e-5
    type_vocab_size: int = 2
    pooling: Literal["eot", "cls", "mean"] = "eot"
    embed_dim: int | None = 512

    @property
    def out_dim(self) -> int:
        """Width of the tower's pooled (and projected) output."""
        return self.embed_dim or self.width

    def check(self, fail: Fail, key: str) -> None:
        check_positive(self, fail, key, ("vocab_size", "context_length", "width", "depth", "num_heads"))
        check_positive(self, fail, key, ("mlp_dim", "norm_eps", *(("type_vocab_size",) if self.kind == "bert" else ())))
        if self.width % self.num_heads:
            fail(f"{key}.num_heads ({self.num_heads}) must divide {key}.width ({self.width})")
        if self.embed_dim is not None and self.embed_dim <= 0:
            fail(f"{key}.embed_dim must be positive or null, got {self.embed_dim}")


@dataclass
class TextConfig:
    """Tokenizer, text length policy and an optional text tower.

    Attributes:
        tokenizer: "clip" (open_clip's CLIP BPE, shipped with open_clip, works offline), "byte" (UTF-8 bytes),
            "wordpiece" (BERT's WordPiece over the vocabulary file `vocab`) or "hf" (a Hugging Face tokenizer.json,
            `vocab`, through the `tokenizers` library: a pretrained language model's own tokenizer).
        max_length: most tokens per text, BOS and EOS included; longer texts lose tokens from the end, EOS kept.
        vocab: the "wordpiece" vocabulary file: BERT's vocab.txt (one token per line) or a Hugging Face
            tokenizer.json with a WordPiece model. A relative path in a YAML file is relative to that file's
            directory; `save_pretrained` writes the vocabulary next to the weights as `vocab.txt` and the saved
            config says `vocab: vocab.txt`, so a checkpoint directory is self-contained.
        lowercase: "wordpiece": lowercase the text first (an uncased model).
        strip_accents: "wordpiece": remove accents; None follows `lowercase`, as BERT does.
        tower: a text transformer of its own for text embeddings (CLIP's text tower, a sentence encoder); None
            means text is embedded only through the backbone.
        vocab_size: rows of the token embedding (and of an LM head); None means the tokenizer's vocabulary size. A
            pretrained language model may have more rows than its tokenizer has ids (padding for speed).
        bos_token, eos_token, pad_token: "hf": the model's special tokens, as text (None: the model has none; BOS
            falls back to EOS, PAD to EOS).
        stop_tokens: "hf": more tokens that end generation besides `eos_token` (Llama 3's "<|eot_id|>", say).
        chat_template: the model's Jinja chat template (as in its tokenizer_config.json or GGUF metadata), which
            turns a conversation into the text the model was trained on; None: the model has none.
    """

    tokenizer: Literal["clip", "byte", "wordpiece", "hf"] = "clip"
    max_length: int = 77
    vocab: str | None = None
    lowercase: bool = True
    strip_accents: bool | None = None
    tower: TextTowerConfig | None = None
    vocab_size: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    stop_tokens: list[str] = field(default_factory=list)
    chat_template: str | None = None

    def check(self, fail: Fail, key: str) -> None:
        """Tokenizer files and the text tower's shape; the vocabulary file itself is read when the model is built."""
        if self.max_length < 2:
            fail(f"{key}.max_length must leave room for BOS and EOS, got {self.max_length}")
        if self.tokenizer == "wordpiece" and not self.vocab:
            fail(f"{key}.tokenizer 'wordpiece' needs {key}.vocab, the path of its vocab.txt")
        if self.tokenizer not in ("wordpiece", "hf") and self.vocab is not None:
            fail(
                f"{key}.vocab is read only by the 'wordpiece' and 'hf' tokenizers, but {key}.tokenizer is "
                f"{self.tokenizer!r}"
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            fail(f"{key}.vocab_size must be >= 1, got {self.vocab_size}")
        special = ("bos_token", "eos_token", "pad_token", "stop_tokens")
        if self.tokenizer != "hf" and any(getattr(self, name) for name in special):
            fail(
                f"{key}.{', '.join(special)} are read only by the 'hf' tokenizer, but {key}.tokenizer is "
                f"{self.tokenizer!r}"
            )
        if self.tower is not None:
            self.tower.check(fail, f"{key}.tower")
            if self.max_length > self.tower.context_length:
                fail(
                    f"{key}.max_length ({self.max_length}) exceeds {key}.tower.context_length "
                    f"({self.tower.context_length})"
                )


@dataclass
class RopeScalingConfig:
    """Llama 3.1's RoPE frequency scaling: long wavelengths are slowed by `factor`, short ones kept, and the band
    between is interpolated, so a model trained on `original_max_seq_len` tokens reads longer sequences.

    Attributes:
        type: the scaling rule; only "llama3".
        factor: how much the long wavelengths are stretched.
        low_freq_factor: wavelengths longer than original_max_seq_len / low_freq_factor are fully scaled.
        high_freq_factor: wavelengths shorter than original_max_seq_len / high_freq_factor are kept.
        original_max_seq_len: the context length the model was pretrained with.
    """

    type: Literal["llama3"] = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def check(self, fail: Fail, key: str) -> None:
        check_positive(self, fail, key, ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"))
        if self.high_freq_factor <= self.low_freq_factor:
            fail(
                f"{key}.high_freq_factor ({self.high_freq_factor}) must exceed {key}.low_freq_factor "
                f"({self.low_freq_factor})"
            )


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
        qkv_bias: the query, key and value projections have biases (Qwen2).
        rope_scaling: stretch RoPE's long wavelengths for long contexts (Llama 3.1's "llama3" scaling); None: plain.
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
    qkv_bias: bool = False
    rope_scaling: RopeScalingConfig | None = None

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

    def check(self, fail: Fail, key: str) -> None:
        check_positive(self, fail, key, ("dim", "depth", "num_heads", "max_seq_len"))
        check_positive(self, fail, key, ("num_kv_heads", "hidden_dim", "rope_theta", "norm_eps"))
        if self.dim % self.num_heads:
            fail(f"{key}.num_heads ({self.num_heads}) must divide {key}.dim ({self.dim})")
        if self.num_heads % self.kv_heads:
            fail(f"{key}.num_kv_heads ({self.kv_heads}) must divide {key}.num_heads ({self.num_heads})")
        if self.head_dim % 2:
            fail(f"{key}.dim / {key}.num_heads = {self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"{key}.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            self.rope_scaling.check(fail, f"{key}.rope_scaling")


@dataclass
class CaptionHeadConfig:
    """Text generation from the backbone: an LM head, tied to the text embedding or a matrix of its own.

    Attributes:
        max_new_tokens: default generation length.
        tied: the LM head's weight is the token embedding table (False: an untied head, as Llama 3 8B has).
    """

    max_new_tokens: int = 32
    tied: bool = True

    def check(self, fail: Fail, key: str) -> None:
        if self.max_new_tokens < 1:
            fail(f"{key}.max_new_tokens must be >= 1, got {self.max_new_tokens}")


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

    def check(self, fail: Fail, key: str) -> None:
        if not self.labels:
            fail(f"{key}.labels must name at least one class")
        if len(set(self.labels)) != len(self.labels):
            fail(f"{key}.labels has duplicates")


@dataclass
class EmbeddingSourceConfig:
    """Where each modality's contrastive embedding comes from.

    "backbone": the modality's segment is read by the backbone, pooled and projected by the contrastive head
    (mmfm's own path). "tower": the modality's encoder embeds it on its own, as a dual-tower model does: the
    text tower's pooled output (`text.tower`), or the image encoder's pooled head (`image.global_pool`,
    `image.head_dim`). Modalities may differ, e.g. a frozen pretrained text tower with images through the backbone.

    Attributes:
        text: "backbone" or "tower".
        image: "backbone" or "tower".
        audio: "backbone" (audio has no tower).
    """

    text: Literal["backbone", "tower"] = "backbone"
    image: Literal["backbone", "tower"] = "backbone"
    audio: Literal["backbone"] = "backbone"


@dataclass
class ContrastiveHeadConfig:
    """Unit embeddings per modality for retrieval and zero-shot classification.

    Attributes:
        embed_dim: embedding width; a "tower" source must output exactly this width.
        init_temperature: initial softmax temperature of the InfoNCE logits (learned unless frozen).
        learn_temperature: whether the temperature is trained.
        templates: zero-shot prompt templates; each "{}" is replaced by a label and the embeddings averaged.
        source: per modality, "backbone" (pool + project backbone states) or "tower" (the encoder's own embedding).
    """

    embed_dim: int = 512
    init_temperature: float = 0.07
    learn_temperature: bool = True
    templates: list[str] = field(default_factory=lambda: ["{}"])
    source: EmbeddingSourceConfig = field(default_factory=EmbeddingSourceConfig)

    def check(self, fail: Fail, key: str) -> None:
        if self.embed_dim <= 0:
            fail(f"{key}.embed_dim must be positive, got {self.embed_dim}")
        if self.init_temperature <= 0:
            fail(f"{key}.init_temperature must be positive, got {self.init_temperature}")
        if not all("{}" in t for t in self.templates) or not self.templates:
            fail(f'{key}.templates must be a non-empty list of strings that each contain "{{}}"')


@dataclass
class ImageGenHeadConfig:
    """Image generation: a diffusers denoiser cross-attending to the backbone states of the condition.

    The denoiser's cross-attention width is `backbone.dim`. In latent space the denoiser works on the latents of
    a frozen diffusers `AutoencoderKL` read from `vae_path`; `save_pretrained` writes it into the checkpoint's
    `vae/` folder (see `mmfm.heads.image_gen`). The noise schedule fields are diffusers' scheduler arguments and
    are shared by training and every sampler.

    Attributes:
        space: "pixel" (the denoiser works on pixels: small images) or "latent" (on VAE latents: larger ones).
        architecture: "unet" (diffusers `UNet2DConditionModel`) or "dit" (diffusers `PixArtTransformer2DModel`).
        image_size: side of the square images generated and trained on, in pixels.
        channels: pixel channels: 1 (greyscale) or 3 (RGB).
        vae_path: local diffusers `AutoencoderKL` directory (save_pretrained layout); latent space only. Relative
            to the YAML file's folder when read from one (a saved checkpoint says `vae`, its own `vae/`).
        block_out_channels: UNet channels per resolution level; every level but the last halves the size.
        layers_per_block: UNet ResNet layers per level.
        attention_head_dim: channels per attention head (UNet levels and DiT blocks).
        norm_num_groups: UNet GroupNorm groups; must divide every entry of block_out_channels.
        dit_width: DiT token width.
        dit_depth: DiT transformer blocks.
        patch_size: DiT patch side, in pixels (or latent pixels).
        prediction_type: what the denoiser predicts: "epsilon" (the noise) or "v_prediction" (the velocity).
        num_train_timesteps: noise levels of the training schedule.
        beta_schedule: diffusers beta schedule: "linear", "scaled_linear" or "squaredcos_cap_v2" (cosine).
        beta_start: first beta of the linear schedules.
        beta_end: last beta of the linear schedules.
        timestep_spacing: how samplers pick their timesteps: "trailing" (starts from the noisiest), "leading"
            or "linspace", as in diffusers.
        cond_dropout: fraction of training examples whose condition is replaced by the learned null condition,
            which classifier-free guidance needs (0 disables guidance's unconditional branch training).
        scheduler: default sampler: "ddpm", "ddim", "dpmsolver++" (multistep DPM-Solver++) or "euler".
        num_inference_steps: default number of sampling steps.
        guidance_scale: default classifier-free guidance scale; 1 means no guidance.
    """

    space: Literal["pixel", "latent"] = "pixel"
    architecture: Literal["unet", "dit"] = "unet"
    image_size: int = 32
    channels: int = 3
    vae_path: str | None = None
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    layers_per_block: int = 2
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    dit_width: int = 384
    dit_depth: int = 12
    patch_size: int = 2
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    cond_dropout: float = 0.1
    scheduler: SchedulerName = "dpmsolver++"
    num_inference_steps: int = 25
    guidance_scale: float = 3.0

    @property
    def downsampling_factor(self) -> int:
        """How many times smaller than its input the denoiser's coarsest grid is: sizes must be multiples of it."""
        if self.architecture == "dit":
            return self.patch_size
        return 2 ** (len(self.block_out_channels) - 1)

    def check(self, fail: Fail, key: str) -> None:
        """The checks that need no file: sizes the denoiser can make, a sane schedule and sampler defaults."""
        for name in ("image_size", "layers_per_block", "attention_head_dim", "num_train_timesteps"):
            if getattr(self, name) <= 0:
                fail(f"{key}.{name} must be positive, got {getattr(self, name)}")
        if self.channels not in (1, 3):
            fail(f"{key}.channels must be 1 (greyscale) or 3 (RGB), got {self.channels}")
        if self.architecture == "unet":
            if not self.block_out_channels or min(self.block_out_channels) <= 0:
                fail(f"{key}.block_out_channels must be a non-empty list of positive widths: {self.block_out_channels}")
            for width in self.block_out_channels:
                if width % self.attention_head_dim or width % self.norm_num_groups:
                    fail(
                        f"{key}.attention_head_dim ({self.attention_head_dim}) and {key}.norm_num_groups "
                        f"({self.norm_num_groups}) must divide every {key}.block_out_channels entry, got {width}"
                    )
            factor = f"the UNet's downsampling factor {self.downsampling_factor} (2 ** (len(block_out_channels) - 1))"
        else:
            for name in ("dit_width", "dit_depth", "patch_size"):
                if getattr(self, name) <= 0:
                    fail(f"{key}.{name} must be positive, got {getattr(self, name)}")
            if self.dit_width % self.attention_head_dim:
                head_dim = self.attention_head_dim
                fail(f"{key}.attention_head_dim ({head_dim}) must divide {key}.dit_width ({self.dit_width})")
            factor = f"the DiT's {key}.patch_size ({self.patch_size})"
        if self.space == "pixel":
            if self.vae_path is not None:
                fail(f"{key}.vae_path is only read in latent space; set {key}.space: latent or drop vae_path")
            if self.image_size % self.downsampling_factor:
                fail(f"{key}.image_size ({self.image_size}) must be a multiple of {factor}")
        elif not self.vae_path:
            fail(f"{key}.space is latent, so {key}.vae_path must name a diffusers AutoencoderKL directory")
        if self.beta_schedule != "squaredcos_cap_v2" and not 0 < self.beta_start < self.beta_end < 1:
            fail(
                f"{key}.beta_start ({self.beta_start}) and beta_end ({self.beta_end}) need "
                "0 < beta_start < beta_end < 1"
            )
        if not 0.0 <= self.cond_dropout < 1.0:
            fail(f"{key}.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            fail(
                f"{key}.num_inference_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {self.num_inference_steps}"
            )
        if not 0.0 <= self.guidance_scale < math.inf:
            fail(f"{key}.guidance_scale must be a finite number >= 0 (1: no guidance), got {self.guidance_scale}")


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
    image_gen: ImageGenHeadConfig | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m == "text" or getattr(self, m) is not None)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        """Builds and validates a config; errors name `source` (a file path, say) and the offending key.

        `data` is held to the limits of a YAML file (`load_yaml`), so no caller can hand in an alias bomb.
        """
        check_config_size(data, source)
        config = build_dataclass(cls, data, source, prefix="")
        validate(config, source)
        return config

    def with_overrides(self, overrides: dict[str, Any], source: str = "<overrides>") -> ModelConfig:
        """A new config with nested (`{"backbone": {"depth": 2}}`) or dotted (`{"backbone.depth": 2}`) overrides."""
        return ModelConfig.from_dict(merge(self.to_dict(), nest_dotted(overrides, source)), source)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds.

    Raises:
        ConfigError: naming `path`, when it is missing, not a regular file, over `MAX_CONFIG_BYTES`, not UTF-8 text,
            not valid YAML, too large once its aliases are expanded (`load_yaml`), or not a mapping.
    """
    data = load_yaml(read_config_text(path, what), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def read_config_text(path: Path, what: str) -> str:
    """The text of a config file: `read_small_file` with the limit `MAX_CONFIG_BYTES`."""
    return read_small_file(path, what, MAX_CONFIG_BYTES, "mmfm.config.MAX_CONFIG_BYTES")


def read_small_file(path: str | Path, what: str, limit: int, limit_name: str) -> str:
    """The UTF-8 text of a file the user named, read only if it is a regular file of at most `limit` bytes.

    It is opened without blocking and checked before anything is read, so a folder, a device (`/dev/zero`), a FIFO
    or a socket is refused at once instead of hanging or filling memory.

    Args:
        path: the file.
        what: what it is, for messages ("config file", "vocabulary file", ...).
        limit: the most bytes read.
        limit_name: where users change the limit, named in the message.

    Raises:
        ConfigError: naming `path` and what was wrong with it.
    """
    name = shorten(str(path))
    raw = None
    try:
        with open(path, "rb", opener=_nonblocking_opener) as f:
            mode = os.fstat(f.fileno()).st_mode
            if stat.S_ISREG(mode):
                raw = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{name}: {what} not found") from None
    except IsADirectoryError:
        mode = stat.S_IFDIR
    except (OSError, ValueError) as e:  # ENAMETOOLONG, ENOTDIR, EACCES; ValueError: a NUL in the path
        raise ConfigError(f"{name}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{name}: the {what} is a folder")
    if raw is None:
        raise ConfigError(f"{name}: the {what} is not a regular file (a device, FIFO or socket)")
    if len(raw) > limit:
        raise ConfigError(f"{name}: the {what} is over {limit} bytes (the limit is {limit_name})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{name}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); a binary file?"
        ) from None


def _nonblocking_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """PyYAML's safe loader (libyaml's when installed: several times faster): plain data, no Python objects."""


def load_yaml(text: str, source: str) -> Any:
    """The data of a YAML document, refused unless it is small once its aliases are expanded.

    A YAML alias repeats a value without repeating its text, so a 1 KB document can stand for a billion values
    (an "alias bomb") that any copy, error message or save of it would spell out. The expanded document may hold at
    most `MAX_CONFIG_SIZE` units (one per value, plus one per character of text) and nest at most
    `MAX_CONFIG_DEPTH` levels; an alias inside the value it names (a cycle) and text with lone surrogates (not
    Unicode, so never writable) are refused too.

    Raises:
        ConfigError: naming `source` and what was wrong.
    """
    try:
        data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({clip(str(e), 400)})") from None
    except (ValueError, OverflowError, TypeError, RecursionError) as e:  # e.g. a 5000-digit int, a bad date
        raise ConfigError(f"{source}: not valid YAML ({type(e).__name__}: {clip(str(e), 200)})") from None
    check_config_size(data, source)
    return data


def check_config_size(data: Any, source: str) -> int:
    """The size of `data` with shared values counted each time they appear (`load_yaml` says which limits apply).

    Shared values are sized once (memoised by identity), so the check takes time proportional to the distinct
    values, however many times they repeat.
    """
    limit, max_depth = MAX_CONFIG_SIZE, MAX_CONFIG_DEPTH
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def name(where: tuple | None) -> str:
        parts = []
        while where is not None:
            where, part = where
            parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
        return clip("".join(reversed(parts)).lstrip(".") or "config", 120)

    def size(value: Any, where: tuple | None, depth: int) -> int:
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ConfigError(
                        f"{source}: '{name(where)}' holds a lone surrogate (U+{ord(value[e.start]):04X}), "
                        "which is not Unicode text"
                    ) from None
            return 1 + len(value)
        if isinstance(value, bytes):
            return 1 + len(value)
        if not isinstance(value, (dict, list, tuple, set, frozenset)):
            return 1
        ident = id(value)
        if ident in sizes:
            return sizes[ident]
        if ident in open_ids:
            raise ConfigError(f"{source}: '{name(where)}' contains itself (a YAML alias inside the value it names)")
        if depth >= max_depth:
            raise ConfigError(
                f"{source}: '{name(where)}' nests more than {max_depth} levels deep "
                "(the limit is mmfm.config.MAX_CONFIG_DEPTH)"
            )
        open_ids.add(ident)
        total = 1
        is_mapping = isinstance(value, dict)
        for part, item in value.items() if is_mapping else enumerate(value):
            inside = (where, (clip(part, 60) if isinstance(part, str) else quote(part, 60)) if is_mapping else part)
            if is_mapping:
                total += size(part, inside, depth + 1)
            total += size(item, inside, depth + 1)
            if total > limit:
                raise ConfigError(
                    f"{source}: '{name(where)}' is too large: over {limit} values and characters once its YAML "
                    "aliases are expanded (an alias bomb?); the limit is mmfm.config.MAX_CONFIG_SIZE"
                )
        open_ids.discard(ident)
        sizes[ident] = total
        return total

    return size(data, None, 0)


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, marked with "..." where it was cut."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def shorten(text: str, limit: int = 200) -> str:
    """A name the user gave (a path, an argument) as an error message quotes it: control characters escaped, and
    when longer than `limit`, its middle elided so that the start and the end (a file's extension) still show.
    """
    if not text.isprintable():
        text = repr(text)[1:-1]
    if len(text) <= limit:
        return text
    keep = max(limit // 2, 1)
    return f"{text[:keep]}...({len(text) - 2 * keep} characters)...{text[-keep:]}"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def quote(value: Any, limit: int = 100) -> str:
    """`repr(value)` for an error message: at most about `limit` characters, whatever the value's size or nesting.

    Values in errors come from files and command lines; an alias bomb or a 10 MB string must not be spelled out.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that raises (a huge int) still leaves a message
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


def nest_dotted(overrides: dict[str, Any], source: str = "<overrides>") -> dict[str, Any]:
    """`{"backbone.depth": 2, "text": {...}}` -> `{"backbone": {"depth": 2}, "text": {...}}`.

    Raises:
        ConfigError: a key that is not text, has an empty part (`a..b`), or sets a section and a field inside it to
            conflicting values.
    """
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: override key {quote(key)} must be text such as 'backbone.depth'")
        *parents, leaf = key.split(".")
        if not all(parents) or not leaf:
            raise ConfigError(f"{source}: override key {quote(key)} has an empty part; write e.g. 'backbone.depth'")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {quote(key)}: '{part}' is set to a value, not a section")
        if isinstance(node.get(leaf), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: override {quote(key)} replaces a section that other overrides set")
            value = merge(node[leaf], value)
        node[leaf] = value
    return nested


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
    """Rejects combinations that cannot build a model, naming the keys involved.

    Each component checks itself (`check(fail, key)`); what spans components is checked here.
    """

    def fail(msg: str) -> None:
        raise ConfigError(f"{source}: {msg}")

    for f in dataclasses.fields(config):
        component = getattr(config, f.name)
        if dataclasses.is_dataclass(component):
            component.check(fail, f.name)
    if config.text.max_length > config.backbone.max_seq_len:
        fail(f"text.max_length ({config.text.max_length}) exceeds backbone.max_seq_len ({config.backbone.max_seq_len})")
    if config.classify is not None and not any(getattr(config, m) is not None for m in MEDIA_MODALITIES):
        fail("classify needs an image or audio encoder to classify")
    _validate_sources(config, fail)


def _validate_sources(config: ModelConfig, fail: Fail) -> None:
    """A "tower" embedding source needs that tower; widths that only the built encoder knows are checked there."""
    if config.contrastive is None:
        return
    source = config.contrastive.source
    if source.text == "tower":
        if config.text.tower is None:
            fail("contrastive.source.text is 'tower' but text.tower is not set")
        if config.text.tower.out_dim != config.contrastive.embed_dim:
            fail(
                f"contrastive.source.text is 'tower': text.tower outputs {config.text.tower.out_dim} wide embeddings "
                f"but contrastive.embed_dim is {config.contrastive.embed_dim}"
            )
    if source.image == "tower":
        if config.image is None:
            fail("contrastive.source.image is 'tower' but the model has no image encoder")
        if config.image.global_pool is None:
            fail("contrastive.source.image is 'tower' but image.global_pool is not set (e.g. 'token' or 'avg')")


def to_plain(value: Any) -> Any:
    """Dataclass-asdict output with tuples turned into lists, as YAML writes them."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def build_dataclass(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a mapping, coercing YAML types; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {quote(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(clip(key, 100), names, n=3, cutoff=0.6) if isinstance(key, str) else []
            hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
            shown = clip(key, 100) if isinstance(key, str) else quote(key, 100)
            raise ConfigError(f"{source}: unknown config key '{prefix}{shown}'{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, source, prefix + key)
    return cls(**kwargs)


# A number as people write it, YAML 1.2's float syntax: "1e-3" and "3E5" (which YAML 1.1 reads as text), "0.5", "2".
_NUMBER = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _number(value: Any) -> Any:
    """`value` as a float when it is text spelling a number ("1e-3"), else `value` unchanged."""
    if isinstance(value, str) and len(value) <= 64 and _NUMBER.fullmatch(value):
        return float(value)
    return value


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
        if isinstance(value, (dict, list, set)) or value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {quote(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {quote(value)}")
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(f"{source}: '{key}' must have text keys, got {quote(name)}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {quote(value)}")
        fixed = origin is tuple and Ellipsis not in args  # tuple[float, float]: exactly two
        if fixed and len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {quote(value)}")
        items = [_coerce(args[i] if fixed else args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is float:
        value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {quote(value)}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value}")
    if hint is int and isinstance(value, str):
        number = _number(value)
        if isinstance(number, float) and number.is_integer() and abs(number) <= 2**53:
            value = int(number)  # "1e4" on a command line means 10000
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CONFIG_INT:
            raise ConfigError(f"{source}: '{key}' is too large an integer (at most {MAX_CONFIG_INT}): {quote(value)}")
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {quote(value)}")
    if not isinstance(value, hint):
        raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {type(value).__name__} {quote(value)}")
    if hint is str and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"{source}: '{key}' holds a lone surrogate (U+{ord(value[e.start]):04X}), which is not Unicode text"
            ) from None
    return value
