"""The text encoder: a token embedding table that turns ids into the backbone's token space."""

from __future__ import annotations

from torch import Tensor, nn

from mmfm.errors import InputError


class TextEncoder(nn.Module):
    """Embeds token ids; text needs no projector, its embeddings already live in the backbone's space.

    `embed.weight` (vocab_size, dim) is also the caption head's output matrix: the LM head ties its weight
    to it, so resizing or replacing `embed` changes both.

    Args:
        vocab_size: number of token ids, the tokenizer's `vocab_size`.
        dim: embedding width, the backbone's `dim`.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        """Looks up the embedding of every id.

        Args:
            ids: (B, L) integer token ids.

        Returns:
            (B, L, dim) embeddings.

        Raises:
            InputError: an id is negative or not below `vocab_size`.
        """
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(
                f"token ids must be in [0, {self.vocab_size}), got min {ids.min().item()} and max {ids.max().item()}"
                " (was the text tokenized with a different tokenizer?)"
            )
        return self.embed(ids)
