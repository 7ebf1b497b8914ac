"""The multimodal model: modality encoders -> projectors -> one backbone -> task heads, and its user API."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.backbone import Backbone
from mmfm.config import DEFAULT_BATCH_SIZE, HEADS, MEDIA, MEDIA_MODALITIES, ModelConfig, import_object
from mmfm.decoding import DecoderParts
from mmfm.encoders.token_embedding import TokenEmbedding
from mmfm.encoders.tokenizers import Tokenizer, build_tokenizer
from mmfm.errors import ConfigError, InputError
from mmfm.pass_cache import PassCache
from mmfm.projector import Projector
from mmfm.sequence import Segment, TokenSequence

if TYPE_CHECKING:
    from PIL import Image

    from mmfm.chat_format import ChatInputs
    from mmfm.pipelines import Classification


@dataclass
class ModelOutput:
    """What `MultimodalModel.forward` returns.

    Attributes:
        hidden: (B, L, D) backbone states of the whole sequence (media segments, then text).
        mask: (B, L) True on real tokens.
        segments: where each modality's tokens sit along L.
        logits: (B, T, vocab) next-token logits of the text segment, when text was given and the model has a
            caption head; else None.
    """

    hidden: Tensor
    mask: Tensor
    segments: tuple[Segment, ...]
    logits: Tensor | None = None


class MultimodalModel(nn.Module):
    """Encoders, projectors, backbone and heads, composed by modality- and task-keyed ModuleDicts.

    `towers` holds modality towers that embed outside the backbone (`towers["text"]`: a CLIP text tower or a
    sentence encoder, from `config.text.tower`); the contrastive head uses them where `config.contrastive.source`
    says "tower", and the image encoder's own pooled head for a "tower" image source.

    Args:
        config: the whole model's config; saved beside every checkpoint.
        tokenizer: a ready tokenizer (one read from a GGUF file, say) instead of building the one `config.text`
            names.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.config = config
        dim = config.backbone.dim
        self.tokenizer = build_tokenizer(config.text) if tokenizer is None else tokenizer
        vocab_size = config.text.vocab_size or self.tokenizer.vocab_size
        if vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"{config.name}: text.vocab_size ({vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size} ids)"
            )
        # registered first, so a tied LM head is saved under this name
        self.token_embedding = TokenEmbedding(vocab_size, dim)
        self.processors: dict[str, Any] = {}
        encoders: dict[str, nn.Module] = {}
        for modality, spec in MEDIA.items():
            media_config = getattr(config, modality)
            if media_config is not None:
                encoders[modality] = import_object(spec.encoder)(media_config)
                self.processors[modality] = import_object(spec.processor).for_encoder(encoders[modality], media_config)
        self.encoders = nn.ModuleDict(encoders)
        self.projectors = nn.ModuleDict(
            {m: Projector(encoder.width, dim, getattr(config, m).projector) for m, encoder in encoders.items()}
        )
        self.towers = nn.ModuleDict({} if config.text.tower is None else {"text": self._text_tower(config)})
        self.backbone = Backbone(config.backbone)
        self.heads = nn.ModuleDict()
        for name, spec in HEADS.items():
            head_config = getattr(config, name)
            if head_config is not None:
                self.heads[name] = import_object(spec.module).build(self, head_config)
        self._pass_cache: PassCache | None = None  # set within `reusing_passes()`
        longest = sum(self.num_media_tokens(m) for m in self.projectors) + config.text.max_length
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
        counts = {"token_embedding": _count_new(self.token_embedding, seen)}
        for group in ("encoders", "projectors", "towers", "heads"):
            for name, module in getattr(self, group).items():
                counts[f"{group}.{name}"] = _count_new(module, seen)
        counts["backbone"] = _count_new(self.backbone, seen)
        return counts

    # ---- the tensor API (used by training, evaluation and the pipelines) ----

    def forward(
        self, media: dict[str, Tensor] | None = None, ids: Tensor | None = None, mask: Tensor | None = None
    ) -> ModelOutput:
        """One pass over a batch of processed inputs: media segments, then text, through the backbone.

        Args:
            media: {"image": (B, C, H, W) pixels, "audio": (B, frames, mel) fbank}, as the processors make them.
            ids: (B, T) right-padded text token ids, BOS first, as `model.tokenizer(texts, max_length)` makes them.
            mask: (B, T) True on real text tokens.

        Returns:
            The backbone states with their mask and segments, and the text's next-token logits where the model
            has a caption head.
        """
        seq = self.sequence(media, ids, mask)
        hidden = self.hidden(seq)
        logits = None
        if ids is not None and "caption" in self.heads:
            text = seq.segment("text")
            logits = self.heads["caption"](hidden[:, text.start : text.end])
        return ModelOutput(hidden, seq.mask, seq.segments, logits)

    def decoder_parts(self) -> DecoderParts:
        """What text decoding needs of the model: its token embedding, backbone and LM head."""
        return DecoderParts(self.token_embedding.lookup, self.backbone, self.head("caption"))

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
        self.require_modality(modality)
        return self._pass(("tokens", modality), (x,), lambda: self.projectors[modality](self.encoders[modality](x)))

    def sequence(
        self, media: dict[str, Tensor] | None = None, ids: Tensor | None = None, mask: Tensor | None = None
    ) -> TokenSequence:
        """Media segments (in the order image, audio) followed by an optional text segment of (B, T) ids."""
        media = media or {}
        for m in media:
            self.require_modality(m)
        parts = [(m, self.media_tokens(m, media[m]), None) for m in MEDIA_MODALITIES if m in media]
        if ids is not None:
            parts.append(("text", self.token_embedding(ids), mask))
        return TokenSequence.concat(parts)

    def hidden(self, seq: TokenSequence) -> Tensor:
        """(B, L, D) backbone states of a sequence under its attention policy."""
        inputs = (seq.embeds, seq.mask) if seq.blocks is None else (seq.embeds, seq.mask, seq.blocks)
        return self._pass(("hidden", seq.segments), inputs, lambda: self.backbone.read(seq))

    def chat_sequence(self, chat: ChatInputs) -> TokenSequence:
        """The sequence of a batch of conversations: token embeddings, each media item's tokens at its slot."""
        embeds = self.token_embedding(chat.ids)  # (B, L, D); media positions hold padding until filled below
        for modality, x in chat.media.items():
            tokens = self.media_tokens(modality, x).to(embeds.dtype)  # (N, n, D)
            rows, starts = chat.slots[modality].unbind(dim=1)  # (N,), (N,)
            positions = starts[:, None] + torch.arange(tokens.shape[1], device=starts.device)  # (N, n)
            embeds = embeds.index_put((rows[:, None].expand_as(positions), positions), tokens)
        return TokenSequence(embeds, chat.mask, (Segment("text", 0, embeds.shape[1]),), chat.blocks)

    def chat_loss(self, chat: ChatInputs, reduction: str = "mean") -> Tensor:
        """Next-token loss over the supervised (assistant) tokens of a batch of conversations.

        The LM head runs only at the positions that predict a supervised token, not over the whole sequence.
        `reduction` is "mean" over supervised tokens or "sum".
        """
        head = self.head("caption")
        hidden = self.hidden(self.chat_sequence(chat))  # (B, L, D)
        predicts = chat.supervised[:, 1:]  # (B, L-1): position t predicts token t + 1
        logits = head(hidden[:, :-1][predicts])  # (n, vocab)
        return F.cross_entropy(logits.float(), chat.ids[:, 1:][predicts], reduction=reduction)

    def caption_logits(self, media: dict[str, Tensor], ids: Tensor, mask: Tensor) -> Tensor:
        """(B, T, vocab) teacher-forced next-token logits of (B, T) caption ids given the media."""
        self.head("caption")
        return self(media, ids, mask).logits

    def caption_loss(self, media: dict[str, Tensor], ids: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Next-token loss of (B, T) caption ids given the media (empty for a text-only LM loss).

        `reduction` is "mean" over predicted tokens or "sum" (for normalising over a larger batch).
        """
        seq = self.sequence(media, ids, mask)
        text = seq.segment("text")
        return self.head("caption").loss(self.hidden(seq)[:, text.start : text.end], ids, mask, reduction)

    def classify_logits(self, media: dict[str, Tensor]) -> Tensor:
        """(B, num_classes) logits of the trained head, pooled over all media tokens."""
        seq = self.sequence(media)
        return self.head("classify")(self.hidden(seq), seq.mask)

    def embed_tensors(self, modality: str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, E) unit embeddings of processed media, or of (B, T) right-padded text ids with their mask.

        From the backbone, or from the modality's own tower where `config.contrastive.source` says "tower".
        """
        head = self.head("contrastive")
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
        gen = self.head("image_gen").config
        self.require_modality("image")
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
        return self.head("image_gen").loss(cond, cond_mask, target, reduction)

    # ---- the user API: raw inputs in, Python values out (`mmfm.pipelines` does the work) ----

    def caption(
        self,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        prompt: str | Sequence[str] | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
        **generation: Any,
    ) -> list[str]:
        """One text per item, `batch_size` items at a time; see `mmfm.pipelines.caption` (generation options)."""
        from mmfm import pipelines

        return pipelines.caption(self, images, audio, prompt, batch_size=batch_size, progress=progress, **generation)

    def classify(
        self,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        labels: Sequence[str] | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
    ) -> Classification:
        """Class probabilities per item, trained head or zero-shot; see `mmfm.pipelines.classify`."""
        from mmfm import pipelines

        return pipelines.classify(self, images, audio, labels, batch_size=batch_size, progress=progress)

    def embed(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
    ) -> Tensor:
        """(N, E) unit embeddings of one modality's items; see `mmfm.pipelines.embed`."""
        from mmfm import pipelines

        return pipelines.embed(self, text, images, audio, batch_size=batch_size, progress=progress)

    def generate_image(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        **options: Any,
    ) -> list[Image.Image]:
        """Images generated from texts, images (variations) or audio; see `mmfm.pipelines.generate_image`."""
        from mmfm import pipelines

        return pipelines.generate_image(self, text, images, audio, **options)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Adds special tokens (mmfm's `<image>`, `<audio>`, ...) to an "hf" tokenizer; returns their ids.

        Tokens the tokenizer already has keep their ids. The token embedding (and an untied LM head) grows to
        hold every id, the new rows set to the mean of the existing ones, so the new tokens start where an
        average token is and the model's outputs on old text are unchanged. `config.text.vocab_size` follows.
        """
        if not hasattr(self.tokenizer, "add_special_tokens"):
            raise InputError(
                f"the {self.config.text.tokenizer!r} tokenizer has a fixed vocabulary; special tokens can be added "
                "to an 'hf' tokenizer only"
            )
        ids = self.tokenizer.add_special_tokens(list(tokens))
        rows = max(self.token_embedding.num_embeddings, self.tokenizer.vocab_size)
        if rows > self.token_embedding.num_embeddings:
            self._grow_vocabulary(rows)
        return ids

    def _grow_vocabulary(self, rows: int) -> None:
        old = self.token_embedding
        grown = TokenEmbedding(rows, old.embedding_dim).to(device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            grown.weight[: old.num_embeddings] = old.weight
            grown.weight[old.num_embeddings :] = old.weight.mean(dim=0)
        self.token_embedding = grown
        if "caption" in self.heads:
            self.heads["caption"].resize(grown)
        self.config.text.vocab_size = rows

    def generate_text(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        messages: Sequence[Any] | None = None,
        stream: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
        **generation: Any,
    ) -> str | list[str] | Iterator[str]:
        """Continues prompts or answers conversations (`messages=`); see `mmfm.text_pipeline.generate_text`."""
        from mmfm import text_pipeline

        return text_pipeline.generate_text(
            self, prompts, messages=messages, stream=stream, batch_size=batch_size, progress=progress, **generation
        )

    def chat(
        self,
        messages: Sequence[Any],
        images: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        *,
        stream: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
        **generation: Any,
    ) -> str | list[str] | Iterator[str]:
        """The reply to a conversation with `<image>`/`<audio>` placeholders; see `mmfm.chat_pipeline.chat`."""
        from mmfm import chat_pipeline

        return chat_pipeline.chat(
            self, messages, images, audio, stream=stream, batch_size=batch_size, progress=progress, **generation
        )

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes `config.yaml` and `model.safetensors` (sharded when large) into `directory`."""
        from mmfm.checkpoint import save_pretrained

        save_pretrained(self, directory)

    # ---- helpers ----

    def _text_tower(self, config: ModelConfig) -> nn.Module:
        from mmfm.encoders.text_tower import TextTower

        if config.text.tower.vocab_size != self.tokenizer.vocab_size:
            raise ConfigError(
                f"{config.name}: text.tower.vocab_size ({config.text.tower.vocab_size}) differs from the "
                f"{config.text.tokenizer!r} tokenizer's vocabulary ({self.tokenizer.vocab_size} ids)"
            )
        return TextTower(config.text.tower)

    def _pass(self, kind: Hashable, inputs: tuple[Tensor, ...], compute: Callable[[], Tensor]) -> Tensor:
        """`compute()`, or the memo's earlier output for equal inputs within `reusing_passes()`."""
        if self._pass_cache is None:
            return compute()
        # a pass made without gradients, or in the other mode, must not stand in for this one
        key = (kind, torch.is_grad_enabled(), self.training)
        return self._pass_cache.get_or_compute(key, inputs, compute)

    def require_modality(self, modality: str) -> None:
        """Raises InputError unless the model has an encoder for this media modality."""
        if modality not in MEDIA_MODALITIES:
            raise InputError(f"unknown media modality '{modality}' (known: {', '.join(MEDIA_MODALITIES)})")
        if modality not in self.encoders:
            raise InputError(
                f"this model has no '{modality}' encoder (it has: {', '.join(self.encoders) or 'none'}); "
                f"set config.{modality} to add one"
            )

    def head(self, name: str) -> nn.Module:
        """The named head; InputError (naming the heads it has) when the model lacks it."""
        if name not in self.heads:
            raise InputError(
                f"this model has no '{name}' head (it has: {', '.join(self.heads) or 'none'}); "
                f"set config.{name} to add one"
            )
        return self.heads[name]


def _count_new(module: nn.Module, seen: set[int]) -> int:
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
