"""Decoder states that feed `mmfm.generation`: one with a KV cache, one that recomputes every step."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmfm.backbone import KVCache
from mmfm.sequence import Segment, TokenSequence

if TYPE_CHECKING:
    from mmfm.model import MultimodalModel


class CachedDecoder:
    """Prefills the prompt once, then runs one token per step against the KV cache.

    Args:
        model: supplies the backbone, text embedding and caption head.
        seq: the prompt; it must end with a text segment whose padding (if any) is on the left.
        max_new_tokens: room reserved in the cache.
    """

    def __init__(self, model: MultimodalModel, seq: TokenSequence, max_new_tokens: int):
        self.model = model
        B, L = seq.mask.shape
        self.cache = KVCache(model.config.backbone, B, L + max_new_tokens, seq.embeds.dtype, seq.embeds.device)
        # Keys visible to a new token: every real prompt token and every generated one.
        self.key_mask = torch.cat([seq.mask, seq.mask.new_ones(B, max_new_tokens)], dim=1)  # (B, L + new)
        self.has_padding = not bool(seq.mask.all())
        self.next_pos = seq.mask.long().sum(dim=1, keepdim=True)  # (B, 1)
        hidden = model.backbone(seq.embeds, seq.positions(), seq.attention_mask(), self.cache)
        self.logits = model.heads["caption"](hidden[:, -1])  # (B, V)

    def advance(self, tokens: Tensor) -> None:
        x = self.model.encoders["text"].embed(tokens[:, None])  # (B, 1, D); generated ids need no range check
        mask = self.key_mask[:, None, None, : self.cache.length + 1] if self.has_padding else None
        hidden = self.model.backbone(x, self.next_pos, mask, self.cache)
        self.next_pos = self.next_pos + 1
        self.logits = self.model.heads["caption"](hidden[:, -1])

    def reorder(self, index: Tensor) -> None:
        self.cache.reorder(index)
        self.key_mask, self.next_pos, self.logits = self.key_mask[index], self.next_pos[index], self.logits[index]


class RecomputingDecoder:
    """Runs the whole sequence through the backbone at every step: the reference the cache must match."""

    def __init__(self, model: MultimodalModel, seq: TokenSequence):
        self.model, self.seq = model, seq
        self.logits = model.heads["caption"](model.hidden(seq)[:, -1])

    def advance(self, tokens: Tensor) -> None:
        seq = self.seq
        x = self.model.encoders["text"].embed(tokens[:, None])  # (B, 1, D); generated ids need no range check
        last = seq.segments[-1]
        self.seq = TokenSequence(
            torch.cat([seq.embeds, x], dim=1),
            torch.cat([seq.mask, seq.mask.new_ones(seq.mask.shape[0], 1)], dim=1),
            seq.segments[:-1] + (Segment(last.modality, last.start, last.end + 1),),
        )
        self.logits = self.model.heads["caption"](self.model.hidden(self.seq)[:, -1])

    def reorder(self, index: Tensor) -> None:
        self.seq = replace(self.seq, embeds=self.seq.embeds[index], mask=self.seq.mask[index])
        self.logits = self.logits[index]
