"""Contrastive head: one unit embedding per modality, InfoNCE with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.config import ContrastiveHeadConfig
from mmfm.pooling import last_token, masked_mean

_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: the temperature never drops below 0.01


class ContrastiveHead(nn.Module):
    """Pools a segment's backbone states and projects them to a unit embedding.

    Text is pooled at its last real token (EOS, which has read the whole text under causal attention);
    media segments, read bidirectionally, by their mean.

    Args:
        dim: backbone width.
        config: embedding width, temperature, zero-shot templates.
        modalities: the modalities the model has, one projection each.
    """

    def __init__(self, dim: int, config: ContrastiveHeadConfig, modalities: tuple[str, ...]):
        super().__init__()
        self.templates = list(config.templates)
        self.proj = nn.ModuleDict({m: nn.Linear(dim, config.embed_dim, bias=False) for m in modalities})
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.init_temperature)), requires_grad=config.learn_temperature
        )

    def forward(self, modality: str, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, N, D) states of one segment and its (B, N) mask -> (B, embed_dim) unit embeddings."""
        pooled = last_token(hidden, mask) if modality == "text" else masked_mean(hidden, mask)
        return F.normalize(self.proj[modality](pooled), dim=-1)

    def logits(self, a: Tensor, b: Tensor) -> Tensor:
        """(Ba, E) x (Bb, E) unit embeddings -> (Ba, Bb) similarity logits scaled by 1 / temperature."""
        return self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp() * a @ b.T

    def loss(self, a: Tensor, b: Tensor) -> Tensor:
        """Symmetric InfoNCE over a batch of matching pairs (row i of a goes with row i of b)."""
        logits = self.logits(a, b).float()
        targets = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
