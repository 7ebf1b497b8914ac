"""The text token-embedding table: ids into the backbone's token space."""

from __future__ import annotations

from torch import Tensor, nn

from mmfm.errors import InputError


class TokenEmbedding(nn.Embedding):
    """Embeds token ids; text needs no projector, its embeddings already live in the backbone's space.

    Its `weight` (vocab_size, dim) is also the caption head's output matrix: the LM head ties its weight to it,
    so resizing or replacing the table changes both.

    Args:
        vocab_size: number of token ids, the tokenizer's `vocab_size`.
        dim: embedding width, the backbone's `dim`.
    """

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(vocab_size, dim)
        if not self.weight.is_meta:  # a meta table (to be loaded) holds no values to draw
            nn.init.normal_(self.weight, std=0.02)

    @property
    def vocab_size(self) -> int:
        return self.num_embeddings

    def forward(self, ids: Tensor) -> Tensor:
        """Looks up the (B, L, dim) embeddings of (B, L) integer ids.

        Raises:
            InputError: an id is negative or not below `vocab_size`.
        """
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise InputError(
                f"token ids must be in [0, {self.num_embeddings}), got min {ids.min().item()} and max "
                f"{ids.max().item()} (was the text tokenized with a different tokenizer?)"
            )
        return super().forward(ids)

    def lookup(self, ids: Tensor) -> Tensor:
        """`forward` without the range check, for ids the model generated itself (no device sync per token)."""
        return super().forward(ids)
