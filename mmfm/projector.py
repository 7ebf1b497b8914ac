"""Maps one modality's encoder tokens into the backbone's shared token space."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmfm.config import ProjectorConfig
from mmfm.pooling import AttentionPool


class Projector(nn.Module):
    """Linear or 2-layer MLP projection, optional pooling to K tokens, plus a learned modality embedding.

    Args:
        in_dim: encoder token width.
        out_dim: backbone width.
        config: projection kind and pooled token count.
    """

    def __init__(self, in_dim: int, out_dim: int, config: ProjectorConfig):
        super().__init__()
        if config.kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        heads = max(1, out_dim // 64) if out_dim % 64 == 0 else 1
        self.pool = AttentionPool(out_dim, config.num_tokens, heads) if config.num_tokens else None
        self.modality_embed = nn.Parameter(torch.zeros(out_dim))

    def num_tokens(self, encoder_tokens: int) -> int:
        """How many tokens a media item becomes in the shared space."""
        return self.pool.queries.shape[0] if self.pool is not None else encoder_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, in_dim) encoder tokens -> (B, K or N, out_dim) shared-space tokens."""
        x = self.proj(tokens)
        if self.pool is not None:
            x = self.pool(x)
        return x + self.modality_embed
