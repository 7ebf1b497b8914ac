"""Contrastive head: one unit embedding per modality, InfoNCE with a learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.config import ContrastiveHeadConfig
from mmfm.errors import ConfigError
from mmfm.pooling import last_token, masked_mean

_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: the temperature never drops below 0.01


class ContrastiveHead(nn.Module):
    """Unit embeddings per modality: pooled, projected backbone states, or a tower's own embedding.

    A modality whose `config.source` is "backbone" is pooled from its segment's backbone states and
    projected: text at its last real token (EOS, which has read the whole text under causal attention),
    media segments, read bidirectionally, by their mean. A "tower" modality's encoder embeds it on its own
    (a CLIP text or image tower, a sentence encoder); the head only normalises that embedding (`from_tower`).

    Args:
        dim: backbone width.
        config: embedding width, temperature, zero-shot templates, sources.
        modalities: the modalities the model has; each "backbone" one gets a projection.
        tower_dims: output width of each modality's tower, checked against `config.embed_dim`.

    Raises:
        ConfigError: a "tower" modality's tower is missing or not `embed_dim` wide.
    """

    def __init__(
        self,
        dim: int,
        config: ContrastiveHeadConfig,
        modalities: tuple[str, ...],
        tower_dims: dict[str, int] | None = None,
    ):
        super().__init__()
        self.templates = list(config.templates)
        self.sources = {m: getattr(config.source, m) for m in modalities}
        for m, source in self.sources.items():
            width = (tower_dims or {}).get(m)
            if source == "tower" and width != config.embed_dim:
                raise ConfigError(
                    f"contrastive.source.{m} is 'tower' but the {m} tower "
                    + ("is missing" if width is None else f"outputs {width} wide embeddings")
                    + f", not contrastive.embed_dim = {config.embed_dim}"
                )
        self.proj = nn.ModuleDict(
            {m: nn.Linear(dim, config.embed_dim, bias=False) for m in modalities if self.sources[m] == "backbone"}
        )
        self.logit_scale = nn.Parameter(  # shape (1,), not a scalar: FSDP2 cannot shard 0-dim parameters
            torch.full((1,), math.log(1.0 / config.init_temperature)), requires_grad=config.learn_temperature
        )

    def forward(self, modality: str, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, N, D) states of one segment and its (B, N) mask -> (B, embed_dim) unit embeddings."""
        pooled = last_token(hidden, mask) if modality == "text" else masked_mean(hidden, mask)
        return F.normalize(self.proj[modality](pooled), dim=-1)

    def from_tower(self, embedding: Tensor) -> Tensor:
        """(B, embed_dim) embeddings from a modality's tower -> (B, embed_dim) unit embeddings."""
        return F.normalize(embedding, dim=-1)

    def logits(self, a: Tensor, b: Tensor) -> Tensor:
        """(Ba, E) x (Bb, E) unit embeddings -> (Ba, Bb) similarity logits scaled by 1 / temperature."""
        return self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp() * a @ b.T

    def loss(self, a: Tensor, b: Tensor) -> Tensor:
        """Symmetric InfoNCE over a batch of matching pairs (row i of a goes with row i of b)."""
        logits = self.logits(a, b).float()
        targets = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
