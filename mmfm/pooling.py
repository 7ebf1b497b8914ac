"""Pooling of token sets: masked mean, and attention from learned queries."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, N, D) tokens over the positions where the (B, N) mask is True -> (B, D)."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def last_token(x: Tensor, mask: Tensor) -> Tensor:
    """The (B, D) state of each row's last real token, for right-padded (B, N, D) tokens."""
    index = mask.long().sum(dim=1).sub(1).clamp(min=0)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), index]


class AttentionPool(nn.Module):
    """K learned queries attend over a token set and return K tokens (Perceiver / Q-Former style).

    Args:
        dim: token width.
        num_queries: tokens out.
        num_heads: attention heads; must divide dim.
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int = 1):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, D) tokens, optional (B, N) True-on-real mask -> (B, K, D)."""
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, K, D)
        pad = None if mask is None else ~mask
        out, _ = self.attn(q, x, x, key_padding_mask=pad, need_weights=False)
        return self.norm(out)
