"""Decoder states that feed `mmfm.text_generation`: one with a KV cache, one that recomputes every step.

A decoder sees only what decoding needs of a model (`DecoderParts`: the token embedding, the backbone and the
LM head), never the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mmfm.backbone import Backbone, KVCache
from mmfm.sequence import Segment, TokenSequence


@dataclass
class DecoderParts:
    """The narrow interface decoding uses.

    Attributes:
        embed: (B, T) token ids -> (B, T, D) embeddings (ids the model generated need no range check).
        backbone: the decoder transformer.
        lm_head: (..., D) states -> (..., vocab) next-token logits.
    """

    embed: Callable[[Tensor], Tensor]
    backbone: Backbone
    lm_head: Callable[[Tensor], Tensor]


class CachedDecoder:
    """Prefills the prompt once, then runs one token per step against the KV cache.

    Args:
        parts: the model's token embedding, backbone and LM head.
        seq: the prompt; it must end with a text segment whose padding (if any) is on the left.
        max_new_tokens: room reserved in the cache.
    """

    def __init__(self, parts: DecoderParts, seq: TokenSequence, max_new_tokens: int):
        self.parts = parts
        B, L = seq.mask.shape
        self.cache = KVCache(parts.backbone.config, B, L + max_new_tokens, seq.embeds.dtype, seq.embeds.device)
        # Keys visible to a new token: every real prompt token and every generated one.
        self.key_mask = torch.cat([seq.mask, seq.mask.new_ones(B, max_new_tokens)], dim=1)  # (B, L + new)
        self.has_padding = not bool(seq.mask.all())
        self.next_pos = seq.mask.long().sum(dim=1, keepdim=True)  # (B, 1)
        mask = None if seq.is_plain_causal else seq.attention_mask()  # SDPA's own causal kernel where it can
        hidden = parts.backbone(seq.embeds, seq.positions(), mask, self.cache)
        self.logits = parts.lm_head(hidden[:, -1])  # (B, V)

    def advance(self, tokens: Tensor) -> None:
        x = self.parts.embed(tokens[:, None])  # (B, 1, D)
        mask = self.key_mask[:, None, None, : self.cache.length + 1] if self.has_padding else None
        hidden = self.parts.backbone(x, self.next_pos, mask, self.cache)
        self.next_pos = self.next_pos + 1
        self.logits = self.parts.lm_head(hidden[:, -1])

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)
        self.key_mask, self.next_pos, self.logits = self.key_mask[index], self.next_pos[index], self.logits[index]


class RecomputingDecoder:
    """Runs the whole sequence through the backbone at every step: the reference the cache must match."""

    def __init__(self, parts: DecoderParts, seq: TokenSequence):
        self.parts, self.seq = parts, seq
        self.logits = parts.lm_head(parts.backbone.read(seq)[:, -1])

    def advance(self, tokens: Tensor) -> None:
        seq = self.seq
        x = self.parts.embed(tokens[:, None])  # (B, 1, D)
        last = seq.segments[-1]
        blocks = None if seq.blocks is None else torch.cat([seq.blocks, seq.blocks.new_full((len(x), 1), -1)], dim=1)
        self.seq = TokenSequence(
            torch.cat([seq.embeds, x], dim=1),
            torch.cat([seq.mask, seq.mask.new_ones(seq.mask.shape[0], 1)], dim=1),
            seq.segments[:-1] + (Segment(last.modality, last.start, last.end + 1),),
            blocks,
        )
        self.logits = self.parts.lm_head(self.parts.backbone.read(self.seq)[:, -1])

    def reorder(self, index: Tensor) -> None:
        blocks = None if self.seq.blocks is None else self.seq.blocks[index]
        self.seq = replace(self.seq, embeds=self.seq.embeds[index], mask=self.seq.mask[index], blocks=blocks)
        self.logits = self.logits[index]
