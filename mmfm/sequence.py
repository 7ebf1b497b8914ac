"""The mixed token sequence the backbone reads: embeddings, padding mask, modality ids and segments.

Segments share one layout across the batch: every item has the same segments in the same order, and a
text segment is padded to the longest text in the batch (its mask says which tokens are real). Attention
is bidirectional inside a media segment and causal everywhere else, so text never sees the future while
an image or a clip is read as a whole.

A conversation batch (`mmfm.chat_format`) interleaves media into text at places that differ from row to row: it is
one text segment whose `blocks` say, per row and position, which media item a token belongs to (-1 for text);
attention is bidirectional inside each such block, as inside a media segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmfm.config import MEDIA_MODALITIES, MODALITIES
from mmfm.errors import InputError


@dataclass(frozen=True)
class Segment:
    """One contiguous run of tokens of one modality, positions [start, end)."""

    modality: str
    start: int
    end: int


@dataclass
class TokenSequence:
    """A batch of token sequences in the shared space; `modality_ids` derives from the segments.

    Attributes:
        embeds: (B, L, D) token embeddings.
        mask: (B, L) bool, True on real tokens, False on padding.
        segments: the layout, shared by the whole batch.
        blocks: (B, L) long, for media interleaved at per-row places: the media item (numbered from 0 within
            the row) each position belongs to, -1 on text; None when media sit in segments.
    """

    embeds: Tensor
    mask: Tensor
    segments: tuple[Segment, ...]
    blocks: Tensor | None = None

    @classmethod
    def concat(cls, parts: list[tuple[str, Tensor, Tensor | None]]) -> TokenSequence:
        """Joins `(modality, embeds (B, N, D), mask (B, N) or None)` parts in order into one sequence."""
        if not parts:
            raise InputError("a token sequence needs at least one segment")
        segments, embeds, masks, start = [], [], [], 0
        batch = parts[0][1].shape[0]
        for modality, x, mask in parts:
            if modality not in MODALITIES:
                raise InputError(f"unknown modality '{modality}' (known: {', '.join(MODALITIES)})")
            if x.dim() != 3 or x.shape[0] != batch:
                raise InputError(f"{modality} segment must be (B={batch}, N, D) embeddings, got {tuple(x.shape)}")
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            segments.append(Segment(modality, start, start + x.shape[1]))
            embeds.append(x)
            masks.append(mask)
            start += x.shape[1]
        return cls(torch.cat(embeds, dim=1), torch.cat(masks, dim=1), tuple(segments))

    @property
    def is_plain_causal(self) -> bool:
        """True when plain causal attention is exact: no media segment, no interleaved media and no padding."""
        return all(s.modality == "text" for s in self.segments) and self.blocks is None and bool(self.mask.all())

    @property
    def modality_ids(self) -> Tensor:
        """(L,) index into `MODALITIES` of every position's modality (the same for every row)."""
        ids = torch.empty(self.mask.shape[1], dtype=torch.long, device=self.mask.device)
        for s in self.segments:
            ids[s.start : s.end] = MODALITIES.index(s.modality)
        return ids

    def segment(self, modality: str) -> Segment:
        """The first segment of `modality`."""
        for s in self.segments:
            if s.modality == modality:
                return s
        raise InputError(f"the sequence has no {modality} segment (it has {[s.modality for s in self.segments]})")

    def positions(self) -> Tensor:
        """(B, L) RoPE positions that count real tokens only, so padding inside the sequence shifts nothing."""
        return (self.mask.long().cumsum(dim=1) - 1).clamp(min=0)

    def attention_mask(self) -> Tensor:
        """(B, 1, L, L) bool, True where query i may attend key j."""
        L = self.mask.shape[1]
        device = self.mask.device
        if self.blocks is not None:
            block_id = self.blocks  # (B, L)
        else:
            block_id = torch.full((1, L), -1, dtype=torch.long, device=device)
            for i, s in enumerate(self.segments):
                if s.modality in MEDIA_MODALITIES:
                    block_id[:, s.start : s.end] = i
        same_block = (block_id[:, :, None] == block_id[:, None, :]) & (block_id[:, :, None] >= 0)  # (B|1, L, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        allowed = (causal | same_block) & self.mask[:, None, :]  # (B, L, L)
        # A padded query would otherwise see nothing and turn softmax into NaN; its output is ignored.
        allowed |= torch.eye(L, dtype=torch.bool, device=device)
        return allowed[:, None]
