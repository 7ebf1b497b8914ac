"""The multimodal model: modality encoders -> projectors -> one backbone -> task heads, and its user API."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mmfm.backbone import Backbone
from mmfm.config import MEDIA_MODALITIES, MODALITIES, ModelConfig
from mmfm.decoding import CachedDecoder, RecomputingDecoder
from mmfm.encoders.audio import AudioEncoder
from mmfm.encoders.audio_processor import AudioProcessor
from mmfm.encoders.image_processor import ImageProcessor
from mmfm.encoders.text import TextEncoder
from mmfm.encoders.text_tower import TextTower
from mmfm.encoders.tokenizers import build_tokenizer
from mmfm.encoders.vision import ImageEncoder
from mmfm.errors import ConfigError, InputError
from mmfm.generation import GenerationConfig, generate
from mmfm.heads.caption import CaptionHead
from mmfm.heads.classify import ClassifyHead
from mmfm.heads.contrastive import ContrastiveHead
from mmfm.heads.diffusion import DiffusionHead, to_pil
from mmfm.pass_cache import PassCache
from mmfm.projector import Projector
from mmfm.sequence import TokenSequence


@dataclass
class Classification:
    """What `MultimodalModel.classify` returns.

    Attributes:
        labels: the most likely class of every item.
        probs: (B, num_classes) probabilities; softmax, or independent sigmoids for a multi-label head.
        classes: class names in column order.
    """

    labels: list[str]
    probs: Tensor
    classes: list[str]

    def top(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most likely (class, probability) pairs of every item, best first."""
        values, index = self.probs.topk(min(k, len(self.classes)), dim=-1)
        return [[(self.classes[i], p) for i, p in zip(ix, vs)] for ix, vs in zip(index.tolist(), values.tolist())]

    def above(self, threshold: float = 0.5) -> list[list[str]]:
        """Every class whose probability reaches `threshold`, per item (the multi-label reading)."""
        return [[self.classes[i] for i, p in enumerate(row) if p >= threshold] for row in self.probs.tolist()]


class MultimodalModel(nn.Module):
    """Encoders, projectors, backbone and heads, composed by modality- and task-keyed ModuleDicts.

    `towers` holds modality towers that embed outside the backbone (`towers["text"]`: a CLIP text tower or a
    sentence encoder, from `config.text.tower`); the contrastive head uses them where `config.contrastive.source`
    says "tower", and the image encoder's own pooled head for a "tower" image source.

    Args:
        config: the whole model's config; saved beside every checkpoint.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.backbone.dim
        self.tokenizer = build_tokenizer(config.text)
        self.processors: dict[str, Any] = {}
        encoders: dict[str, nn.Module] = {"text": TextEncoder(self.tokenizer.vocab_size, dim)}
        projectors: dict[str, nn.Module] = {}
        if config.image is not None:
            encoders["image"] = ImageEncoder(config.image)
            self.processors["image"] = ImageProcessor(encoders["image"].data_config, config.image.in_chans)
        if config.audio is not None:
            encoders["audio"] = AudioEncoder(config.audio)
            self.processors["audio"] = AudioProcessor(config.audio)
        for m in MEDIA_MODALITIES:
            if m in encoders:
                projectors[m] = Projector(encoders[m].width, dim, getattr(config, m).projector)
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(projectors)
        self.towers = nn.ModuleDict({} if config.text.tower is None else {"text": self._text_tower(config)})
        self.backbone = Backbone(config.backbone)
        heads: dict[str, nn.Module] = {}
        if config.caption is not None:
            heads["caption"] = CaptionHead(self.encoders["text"].embed)
        if config.classify is not None:
            heads["classify"] = ClassifyHead(dim, config.classify)
        if config.contrastive is not None:
            tower_dims = {m: tower.out_dim for m, tower in self.towers.items()}
            if config.image is not None and config.image.global_pool is not None:  # the image encoder's pooled head
                tower_dims["image"] = encoders["image"].pooled_dim
            heads["contrastive"] = ContrastiveHead(dim, config.contrastive, config.modalities, tower_dims)
        if config.image_gen is not None:
            heads["image_gen"] = DiffusionHead(dim, config.image_gen)
        self.heads = nn.ModuleDict(heads)
        self._pass_cache: PassCache | None = None  # set within `reusing_passes()`
        longest = sum(self.num_media_tokens(m) for m in projectors) + config.text.max_length
        if longest > config.backbone.max_seq_len:
            raise ConfigError(
                f"{config.name}: media tokens plus text.max_length make sequences of {longest} tokens, "
                f"more than backbone.max_seq_len ({config.backbone.max_seq_len})"
            )

    @property
    def device(self) -> torch.device:
        return self.backbone.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.norm.weight.dtype

    def num_media_tokens(self, modality: str) -> int:
        """Tokens one image or clip becomes in the shared space."""
        return self.projectors[modality].num_tokens(self.encoders[modality].num_tokens)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component; a tied weight is counted once, where it is first owned."""
        seen: set[int] = set()
        counts = {}
        for group in ("encoders", "projectors", "towers", "heads"):
            for name, module in getattr(self, group).items():
                counts[f"{group}.{name}"] = _count_new(module, seen)
        counts["backbone"] = _count_new(self.backbone, seen)
        return counts

    # ---- tensor-level building blocks (used by the API below and by training) ----

    @contextlib.contextmanager
    def reusing_passes(self) -> Iterator[PassCache]:
        """Within the block, an encoder or backbone pass over inputs equal to an earlier pass's is not recomputed.

        The trainer computes every task of a step inside one block, so the image classifier and InfoNCE's image
        side share one pass over the images, and the gradients of both flow through it. A shared pass also shares
        its dropout mask. Nested blocks use the outer block's memo.
        """
        if self._pass_cache is not None:
            yield self._pass_cache
            return
        self._pass_cache = PassCache()
        try:
            yield self._pass_cache
        finally:
            self._pass_cache = None

    def media_tokens(self, modality: str, x: Tensor) -> Tensor:
        """Processed media (pixels (B, C, H, W) or fbank (B, frames, mel)) -> (B, N, D) shared-space tokens."""
        self._require_modality(modality)
        return self._pass(("tokens", modality), (x,), lambda: self.projectors[modality](self.encoders[modality](x)))

    def sequence(
        self, media: dict[str, Tensor] | None = None, ids: Tensor | None = None, mask: Tensor | None = None
    ) -> TokenSequence:
        """Media segments (in the order image, audio) followed by an optional text segment of (B, T) ids."""
        media = media or {}
        for m in media:
            self._require_modality(m)
        parts = [(m, self.media_tokens(m, media[m]), None) for m in MEDIA_MODALITIES if m in media]
        if ids is not None:
            parts.append(("text", self.encoders["text"](ids), mask))
        return TokenSequence.concat(parts)

    def hidden(self, seq: TokenSequence) -> Tensor:
        """(B, L, D) backbone states of a sequence under its attention policy."""

        def run() -> Tensor:
            attn_mask = None if seq.is_plain_causal else seq.attention_mask()
            return self.backbone(seq.embeds, seq.positions(), attn_mask)

        return self._pass(("hidden", seq.segments), (seq.embeds, seq.mask), run)

    def caption_logits(self, media: dict[str, Tensor], ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T, vocab) teacher-forced next-token logits of (B, T) caption ids given the media."""
        seq = self.sequence(media, ids, mask)
        text = seq.segment("text")
        return self._head("caption")(self.hidden(seq)[:, text.start : text.end])

    def caption_loss(self, media: dict[str, Tensor], ids: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token loss of (B, T) caption ids given the media (empty for a text-only LM loss).

        `reduction` is "mean" over predicted tokens or "sum" (for normalising over a larger batch).
        """
        seq = self.sequence(media, ids, mask)
        text = seq.segment("text")
        return self._head("caption").loss(self.hidden(seq)[:, text.start : text.end], ids, mask, reduction)

    def classify_logits(self, media: dict[str, Tensor]) -> Tensor:
        """(B, num_classes) logits of the trained head, pooled over all media tokens."""
        seq = self.sequence(media)
        return self._head("classify")(self.hidden(seq), seq.mask)

    def embed_tensors(self, modality: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, E) unit embeddings of processed media, or of (B, T) right-padded text ids with their mask.

        From the backbone, or from the modality's own tower where `config.contrastive.source` says "tower".
        """
        head = self._head("contrastive")
        if head.sources.get(modality) == "tower":
            if modality == "text":
                mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
                return head.from_tower(self.towers["text"](x, mask))
            return head.from_tower(self.encoders[modality].forward_pooled(x))
        seq = self.sequence(ids=x, mask=mask) if modality == "text" else self.sequence({modality: x})
        return head(modality, self.hidden(seq), seq.mask)

    def image_gen_condition(
        self, media: dict[str, Tensor] | None = None, ids: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B, L, D) backbone states of a conditioning sequence (media, then text) and its (B, L) mask.

        Text ids are right-padded with EOS, as `model.tokenizer(texts, config.text.max_length)` makes them.
        """
        seq = self.sequence(media, ids, mask)
        return self.hidden(seq), seq.mask

    def image_gen_targets(self, pixels: Tensor) -> Tensor:
        """Image-encoder pixels -> the image_gen head's training targets.

        Undoes the image processor's normalisation (its mean and std) to [0, 1], resizes (antialiased,
        bilinear) to `image_gen.image_size`, converts to `image_gen.channels` (RGB to grey with ITU-R 601-2
        luma, as PIL does; grey to RGB by repetition) and scales to [-1, 1].

        Args:
            pixels: (B, C, H, W) what `model.processors["image"]` returns, C the image encoder's channels.

        Returns:
            (B, image_gen.channels, image_gen.image_size, image_gen.image_size) images in [-1, 1].
        """
        gen = self._head("image_gen").config
        self._require_modality("image")
        data_config = self.processors["image"].data_config
        stats = [torch.tensor(data_config[k], dtype=pixels.dtype, device=pixels.device) for k in ("mean", "std")]
        mean, std = (x.view(1, -1, 1, 1) for x in stats)
        if pixels.dim() != 4 or pixels.shape[1] != mean.shape[1]:
            raise InputError(f"pixels must be (B, {mean.shape[1]}, H, W) encoder input, got {tuple(pixels.shape)}")
        images = (pixels * std + mean).clamp(0, 1)  # (B, C, H, W) in [0, 1]
        size = gen.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
        if images.shape[1] == 3 and gen.channels == 1:
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
            images = (images * luma.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        elif images.shape[1] == 1 and gen.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        return images * 2 - 1

    def image_gen_loss(
        self,
        media: dict[str, Tensor] | None,
        ids: Tensor | None,
        mask: Tensor | None,
        target: Tensor,
        reduction: str = "mean",
    ) -> Tensor:
        """The image_gen head's denoising loss for target images under a conditioning sequence.

        Args:
            media: processed media of the condition ({"image": ..., "audio": ...}), or None for text alone.
            ids: (B, T) right-padded text ids of the condition, or None.
            mask: (B, T) their mask.
            target: (B, channels, image_size, image_size) images in [-1, 1], e.g. from `image_gen_targets`.
            reduction: "mean" over images (of each image's mean squared error) or "sum".
        """
        cond, cond_mask = self.image_gen_condition(media, ids, mask)
        return self._head("image_gen").loss(cond, cond_mask, target, reduction)

    # ---- the user API: raw inputs in, Python values out ----

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        prompt: str | Sequence[str] | None = None,
        **generation: Any,
    ) -> list[str]:
        """Generates one text per item, from images, audio, both, or a text prompt alone.

        Args:
            images: paths, PIL images, arrays or tensors.
            audio: paths or (waveform, sample_rate) pairs.
            prompt: text that starts every caption (one string, or one per item); it is not returned.
            **generation: `GenerationConfig` fields (max_new_tokens, num_beams, do_sample, temperature, top_k,
                top_p, length_penalty, seed, use_cache).

        Returns:
            The generated text of every item, without the prompt.
        """
        return self.caption_tensors(self._process(images=images, audio=audio), prompt, **generation)

    @torch.no_grad()
    def caption_tensors(
        self, media: dict[str, Tensor], prompt: str | Sequence[str] | None = None, **generation: Any
    ) -> list[str]:
        """`caption` for already processed media: {"image": (B, C, H, W), "audio": (B, frames, mel)}."""
        self._head("caption")
        batch = _batch_size(media, prompt)
        prompts = [prompt] * batch if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch:
            raise InputError(f"got {len(prompts)} prompts for {batch} media items")
        ids, mask = self.tokenizer(
            [p or "" for p in prompts], self.config.text.max_length, add_eos=False, padding_side="left"
        )
        seq = self.sequence(media, ids.to(self.device), mask.to(self.device))
        config = GenerationConfig(**{"max_new_tokens": self.config.caption.max_new_tokens, **generation})
        if seq.mask.shape[1] + config.max_new_tokens > self.config.backbone.max_seq_len:
            raise InputError(
                f"prompt ({seq.mask.shape[1]} tokens) plus max_new_tokens ({config.max_new_tokens}) exceeds "
                f"backbone.max_seq_len ({self.config.backbone.max_seq_len})"
            )
        state = CachedDecoder(self, seq, config.max_new_tokens) if config.use_cache else RecomputingDecoder(self, seq)
        tok = self.tokenizer
        never = [tok.bos_id] if tok.pad_is_token else [tok.bos_id, tok.pad_id]  # CLIP's pad id is also "!"
        return [tok.decode(row) for row in generate(state, config, tok.eos_id, never)]

    @torch.no_grad()
    def classify(
        self,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        labels: Sequence[str] | None = None,
    ) -> Classification:
        """Classifies every item with the trained head, or zero-shot against `labels` through embeddings.

        Zero-shot: each label is written into every template of `config.contrastive.templates`, the text
        embeddings of one label are averaged, and probabilities are the softmax of the scaled cosine
        similarities, as in CLIP.
        """
        if labels is None:
            media = self._process(images=images, audio=audio)
            head = self._head("classify")
            probs = head.probabilities(self.classify_logits(media).float())
            classes = head.labels
        else:
            modality, x = self._one_modality(images=images, audio=audio)
            classes = list(labels)
            if not classes or not all(isinstance(c, str) and c for c in classes):
                raise InputError(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
            head = self._head("contrastive")
            prompts = [t.format(c) for c in classes for t in head.templates]
            text = self._embed_text(prompts).view(len(classes), len(head.templates), -1).mean(dim=1)
            text = torch.nn.functional.normalize(text, dim=-1)  # (C, E)
            probs = head.logits(self.embed_tensors(modality, x), text).float().softmax(dim=-1)
        best = probs.argmax(dim=-1).tolist()
        return Classification([classes[i] for i in best], probs.cpu(), classes)

    @torch.no_grad()
    def embed(
        self,
        text: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
    ) -> Tensor:
        """(B, E) unit embeddings of one modality's items, comparable across modalities by dot product."""
        self._head("contrastive")
        if text is not None:
            if images is not None or audio is not None:
                raise InputError("embed takes one modality at a time: text=, images= or audio=")
            return self._embed_text([text] if isinstance(text, str) else list(text)).cpu()
        modality, x = self._one_modality(images=images, audio=audio)
        return self.embed_tensors(modality, x).cpu()

    @torch.no_grad()
    def generate_image(
        self,
        text: str | Sequence[str] | None = None,
        audio: Sequence[Any] | None = None,
        images: Sequence[Any] | None = None,
        num_images: int = 1,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        image_size: int | None = None,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Generates images conditioned on texts, audio clips or images (variations), or several of them together.

        Each item (a text, a clip, an image, or one of each at the same index) is one condition: the backbone
        reads its sequence, and the image_gen head's denoiser cross-attends to the resulting states.

        Args:
            text: one prompt or a list of prompts.
            audio: paths or (waveform, sample_rate) pairs.
            images: paths, PIL images, arrays or tensors, for image variations.
            num_images: images per condition; the output holds them adjacently, condition by condition.
            guidance_scale: classifier-free guidance scale >= 0, 1 for none (default `image_gen.guidance_scale`).
            num_inference_steps: denoising steps (default `image_gen.num_inference_steps`).
            scheduler: "ddpm", "ddim", "dpmsolver++" or "euler" (default `image_gen.scheduler`).
            seed: makes the images reproducible; give this or `generator`, not both.
            generator: a torch generator for the noise (None and no seed: torch's global RNG).
            image_size: side of the images (default `image_gen.image_size`).
            batch_size: most images denoised at once (default: all of them).
            progress: show a progress bar over the denoising steps.

        Returns:
            len(conditions) * num_images PIL images (mode L or RGB, by `image_gen.channels`).
        """
        head = self._head("image_gen")
        if seed is not None and generator is not None:
            raise InputError("pass seed= or generator=, not both")
        media = self._process(audio=audio, images=images)
        ids = mask = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            ids, mask = self.tokenizer(texts, self.config.text.max_length)
            ids, mask = ids.to(self.device), mask.to(self.device)
            if media and next(iter(media.values())).shape[0] != len(texts):
                raise InputError(f"got {len(texts)} texts for {next(iter(media.values())).shape[0]} media items")
        elif not media:
            raise InputError("generate_image needs text=, audio= or images= to condition on")
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        cond, cond_mask = self.image_gen_condition(media, ids, mask)
        pixels = head.sample(
            cond,
            cond_mask,
            scheduler=scheduler,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            num_images=num_images,
            image_size=image_size,
            batch_size=batch_size,
            progress=progress,
        )
        return to_pil(pixels)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes `config.yaml` and `model.safetensors` (sharded when large) into `directory`."""
        from mmfm.checkpoint import save_pretrained

        save_pretrained(self, directory)

    # ---- helpers ----

    def _embed_text(self, texts: list[str]) -> Tensor:
        ids, mask = self.tokenizer(texts, self.config.text.max_length)
        return self.embed_tensors("text", ids.to(self.device), mask.to(self.device))

    def _text_tower(self, config: ModelConfig) -> TextTower:
        if config.text.tower.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(
                f"{config.name}: text.tower.vocab_size ({config.text.tower.vocab_size}) differs from the "
                f"{config.text.tokenizer!r} tokenizer's vocabulary ({self.tokenizer.vocab_size} ids)"
            )
        return TextTower(config.text.tower)

    def _process(self, **inputs: Sequence[Any] | None) -> dict[str, Tensor]:
        media = {}
        for name, items in inputs.items():
            if items is None:
                continue
            modality = "image" if name == "images" else name
            self._require_modality(modality)
            media[modality] = self.processors[modality](items).to(self.device, self.dtype)
        sizes = {m: x.shape[0] for m, x in media.items()}
        if len(set(sizes.values())) > 1:
            raise InputError(f"every modality needs the same number of items, got {sizes}")
        return media

    def _one_modality(self, **inputs: Sequence[Any] | None) -> tuple[str, Tensor]:
        media = self._process(**inputs)
        if len(media) != 1:
            raise InputError(f"pass exactly one of {', '.join(f'{k}=' for k in inputs)}; got {len(media)}")
        return next(iter(media.items()))

    def _pass(self, kind: Hashable, inputs: tuple[Tensor, ...], compute: Callable[[], Tensor]) -> Tensor:
        """`compute()`, or the memo's earlier output for equal inputs within `reusing_passes()`."""
        if self._pass_cache is None:
            return compute()
        # a pass made without gradients, or in the other mode, must not stand in for this one
        key = (kind, torch.is_grad_enabled(), self.training)
        return self._pass_cache.get_or_compute(key, inputs, compute)

    def _require_modality(self, modality: str) -> None:
        if modality not in MODALITIES:
            raise InputError(f"unknown modality '{modality}' (known: {', '.join(MODALITIES)})")
        if modality not in self.encoders:
            raise InputError(
                f"this model has no '{modality}' encoder (it has: {', '.join(self.encoders)}); "
                f"set config.{modality} to add one"
            )

    def _head(self, name: str) -> nn.Module:
        if name not in self.heads:
            raise InputError(
                f"this model has no '{name}' head (it has: {', '.join(self.heads) or 'none'}); "
                f"set config.{name} to add one"
            )
        return self.heads[name]


def _batch_size(media: dict[str, Tensor], prompt: str | Sequence[str] | None) -> int:
    if media:
        return next(iter(media.values())).shape[0]
    if prompt is None:
        raise InputError("caption needs images=, audio= or a prompt")
    return 1 if isinstance(prompt, str) else len(prompt)


def _count_new(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
