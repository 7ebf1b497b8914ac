"""Contrastive head: one unit embedding per modality, InfoNCE with a learnable temperature."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.config import ContrastiveHeadConfig
from mmfm.errors import ConfigError
from mmfm.objective import Objective
from mmfm.pooling import last_token, masked_mean

if TYPE_CHECKING:
    from mmfm.data import Batch
    from mmfm.model import MultimodalModel

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

    @classmethod
    def build(cls, model: MultimodalModel, config: ContrastiveHeadConfig) -> ContrastiveHead:
        """Towers' widths: the text tower's, and the image encoder's pooled head where it has one."""
        tower_dims = {m: tower.out_dim for m, tower in model.towers.items()}
        if model.config.image is not None and model.config.image.global_pool is not None:
            tower_dims["image"] = model.encoders["image"].pooled_dim
        return cls(model.config.backbone.dim, config, model.config.modalities, tower_dims)

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


class ContrastiveObjective(Objective):
    """Symmetric InfoNCE between two modalities; under torchrun every rank's pairs are negatives for all.

    Embeddings are all-gathered with gradients (`torch.distributed.nn`), so two ranks with B/2 pairs each
    compute exactly the loss one rank computes on the B pairs.
    """

    @classmethod
    def check_inputs(cls, inputs: Sequence[str], fail: Callable[[str], None]) -> None:
        if len(set(inputs)) != 2 or len(inputs) != 2:
            fail(f"a contrastive task needs two different inputs, e.g. [image, text]; got {list(inputs)}")

    def needs(self) -> list[str]:
        return [("caption" if m == "text" else m) for m in self.inputs]

    def embeddings(self, model, batch: Batch, modality: str, rows: Tensor) -> Tensor:
        """(n, E) unit embeddings of one modality for the usable rows."""
        if modality == "text":
            return model.embed_tensors("text", batch.caption_ids[rows], batch.caption_mask[rows])
        return model.embed_tensors(modality, getattr(batch, modality)[rows])

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        a, b = (self.embeddings(model, batch, m, rows) for m in self.inputs)
        valid = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
        if across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Pad to the local batch size so every rank gathers equal shapes; the padding is masked out.
            size = len(batch)
            a, b = (torch.cat(dist_fn.all_gather(F.pad(x, (0, 0, 0, size - x.shape[0])))) for x in (a, b))
            counts = [torch.zeros_like(rows.sum()) for _ in range(dist.get_world_size())]
            dist.all_gather(counts, rows.sum())
            valid = torch.cat([torch.arange(size, device=a.device) < n for n in counts])
        if not valid.any():
            return (a.sum() + b.sum()) * 0.0
        global_loss = model.heads["contrastive"].loss(a[valid], b[valid])
        # Every rank computes the same global mean; its share is weighted by its own units, so the shares
        # summed over ranks (what the trainer normalises) give the global mean back.
        return global_loss * rows.sum()
