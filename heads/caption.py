"""Caption head: next-token logits from backbone states, with the LM head tied to the text embedding."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CaptionHead(nn.Module):
    """A bias-free linear LM head whose weight *is* the text token embedding table.

    Args:
        token_embedding: the text encoder's embedding; tying means a token is read and written with one vector.
    """

    def __init__(self, token_embedding: nn.Embedding):
        super().__init__()
        vocab_size, dim = token_embedding.weight.shape
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = token_embedding.weight

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
