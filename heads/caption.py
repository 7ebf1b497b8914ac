"""Caption head: next-token logits from backbone states, with the LM head tied to the text embedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.config import CaptionHeadConfig
from mmfm.linear import Linear
from mmfm.objective import Objective, media_of

if TYPE_CHECKING:
    from mmfm.data import Batch
    from mmfm.model import MultimodalModel


class CaptionHead(nn.Module):
    """A bias-free linear LM head whose weight is the text token embedding table, or (untied) a matrix of its own.

    Args:
        token_embedding: the model's text token embedding; tying means a token is read and written with one vector.
        tied: share the embedding's weight (False: an own weight, initialised as a copy of the embedding's).
    """

    @classmethod
    def build(cls, model: MultimodalModel, config: CaptionHeadConfig) -> CaptionHead:
        return cls(model.token_embedding, config.tied)

    def __init__(self, token_embedding: nn.Embedding, tied: bool = True):
        super().__init__()
        vocab_size, dim = token_embedding.weight.shape
        self.tied = tied
        self.lm_head = Linear(dim, vocab_size, bias=False)
        if tied:
            self.lm_head.weight = token_embedding.weight
        else:
            self.lm_head.weight = nn.Parameter(token_embedding.weight.detach().clone())

    def resize(self, token_embedding: nn.Embedding) -> None:
        """Follows a grown token embedding: tied, the new table; untied, new rows set to the mean of the old ones."""
        if self.tied:
            self.lm_head = Linear(*token_embedding.weight.shape[::-1], bias=False, device="meta")
            self.lm_head.weight = token_embedding.weight
            return
        old = self.lm_head.weight
        weight = old.new_empty(token_embedding.num_embeddings, old.shape[1])
        with torch.no_grad():
            weight[: old.shape[0]] = old
            weight[old.shape[0] :] = old.mean(dim=0)
        self.lm_head = Linear(old.shape[1], weight.shape[0], bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(weight)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, D) states -> (B, T, vocab) next-token logits."""
        return self.lm_head(hidden)

    def loss(self, hidden: Tensor, ids: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
        """Teacher-forced cross-entropy: the state at text position t predicts token t + 1.

        Args:
            hidden: (B, T, D) backbone states of the text segment.
            ids: (B, T) its token ids, BOS first.
            mask: (B, T) True on real tokens; padded targets are ignored.
            reduction: "mean" over predicted tokens, or "sum" (the trainer normalises over a global batch).
        """
        logits = self(hidden[:, :-1])  # (B, T-1, V)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (B, T-1)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)


class CaptionObjective(Objective):
    """Next-token loss of the caption given the `inputs` media; no inputs is a text-only LM over `text`.

    A task whose inputs are exactly `[audio]` describes sounds: each row trains on its `audio_caption` where it has
    one, else on its `caption` (so manifests without audio captions keep working). Other media tasks train on
    `caption`.
    """

    @classmethod
    def check_inputs(cls, inputs: Sequence[str], fail: Callable[[str], None]) -> None:
        if "text" in inputs:
            fail("a caption task's inputs are media (image, audio) or none for a text-only LM")

    @property
    def audio_only(self) -> bool:
        """Whether the task captions sounds alone (inputs exactly `[audio]`), and so prefers `audio_caption`."""
        return self.inputs == ["audio"]

    def needs(self) -> list[str]:
        if not self.inputs:
            return ["text"]
        return list(self.inputs) if self.audio_only else [*self.inputs, "caption"]

    def rows(self, batch: Batch) -> Tensor:
        """(B,) bool: rows with every input and a text to train on (an audio task takes either kind of caption)."""
        ok = super().rows(batch)
        return ok & (batch.has_audio_caption | batch.has_caption) if self.audio_only else ok

    def target(self, batch: Batch, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(n, T) ids and mask of the text each of the `rows` trains on (see the class docstring)."""
        if not self.inputs:
            return batch.text_ids[rows], batch.text_mask[rows]
        if not self.audio_only or batch.audio_caption_ids is None:
            return batch.caption_ids[rows], batch.caption_mask[rows]
        own = batch.has_audio_caption[rows]
        heard = batch.audio_caption_ids[rows], batch.audio_caption_mask[rows]
        if own.all():
            return heard
        return _per_row(own, heard, (batch.caption_ids[rows], batch.caption_mask[rows]))

    def references(self, batch: Batch, rows: Tensor) -> list[list[str]]:
        """The reference texts of the `rows`, from the field `target` trains each of them on (for exact match)."""
        captions = batch.captions
        if self.audio_only:
            captions = [heard or seen for heard, seen in zip(batch.audio_captions, batch.captions)]
        return [refs for refs, keep in zip(captions, rows.tolist()) if keep]

    def units(self, batch: Batch) -> Tensor:
        _, mask = self.target(batch, self.rows(batch))
        return mask[:, 1:].sum()

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        ids, mask = self.target(batch, rows)
        return model.caption_loss(media_of(batch, self.inputs, rows), ids, mask, reduction="sum")


def _per_row(first: Tensor, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Per row, the (ids, mask) of `a` where `first` is True, else of `b`.

    The narrower pair is right-padded to the wider one's length with masked positions; their id (0) is never a
    target, and no real token attends to it.
    """
    width = max(a[0].shape[1], b[0].shape[1])
    (a_ids, a_mask), (b_ids, b_mask) = ((F.pad(x, (0, width - x.shape[1])) for x in pair) for pair in (a, b))
    pick = first[:, None]  # (n, 1)
    return torch.where(pick, a_ids, b_ids), torch.where(pick, a_mask, b_mask)


class ChatObjective(Objective):
    """Next-token loss of the assistant replies of conversations (`Batch.chat`), with their interleaved media.

    A unit is a supervised token. The media a conversation reads come with it, so the task takes no `inputs`.
    """

    @classmethod
    def check_inputs(cls, inputs: Sequence[str], fail: Callable[[str], None]) -> None:
        if inputs:
            fail("a chat task takes no inputs: each conversation's media come with it (its <image>/<audio> items)")

    def needs(self) -> list[str]:
        return ["chat"]

    def units(self, batch: Batch) -> Tensor:
        if batch.chat is None:
            return torch.zeros((), dtype=torch.long, device=batch.index.device)
        return batch.chat.supervised[:, 1:].sum()

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        if batch.chat is None:  # no conversation in this micro-batch: a zero that back-propagates nothing
            return model.token_embedding.weight[:0].sum()
        return model.chat_loss(batch.chat, reduction="sum")
