"""Classification head: pool a media segment's states, then one linear layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from mmfm.config import ClassifyHeadConfig
from mmfm.objective import Objective, media_of
from mmfm.pooling import AttentionPool, masked_mean

if TYPE_CHECKING:
    from mmfm.data import Batch
    from mmfm.model import MultimodalModel


class ClassifyHead(nn.Module):
    """Mean or learned-query pooling + linear; softmax cross-entropy, or per-class sigmoid for multi-label.

    Args:
        dim: backbone width.
        config: class names, pooling and label mode.
    """

    @classmethod
    def build(cls, model: MultimodalModel, config: ClassifyHeadConfig) -> ClassifyHead:
        return cls(model.config.backbone.dim, config)

    def __init__(self, dim: int, config: ClassifyHeadConfig):
        super().__init__()
        self.labels = list(config.labels)
        self.multi_label = config.multi_label
        self.pool = AttentionPool(dim, 1) if config.pool == "query" else None
        self.fc = nn.Linear(dim, len(self.labels))
        nn.init.zeros_(self.fc.bias)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, N, D) states of the segment and its (B, N) mask -> (B, num_classes) logits."""
        pooled = masked_mean(hidden, mask) if self.pool is None else self.pool(hidden, mask)[:, 0]  # (B, D)
        return self.fc(pooled)

    def probabilities(self, logits: Tensor) -> Tensor:
        return logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)

    def loss(self, logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy against (B,) class indices, or BCE against (B, num_classes) multi-hot targets.

        `reduction` is "mean" or "sum" over items; a multi-label item's loss is its mean over classes.
        """
        if self.multi_label:
            per_item = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").mean(-1)
            return per_item.sum() if reduction == "sum" else per_item.mean()
        return F.cross_entropy(logits.float(), targets, reduction=reduction)


class ClassifyObjective(Objective):
    """Cross-entropy of the trained classification head over one media modality."""

    @classmethod
    def check_inputs(cls, inputs: Sequence[str], fail: Callable[[str], None]) -> None:
        if len(inputs) != 1:
            fail(f"a classify task reads one input modality, got {list(inputs)}")
        if list(inputs) == ["text"]:
            fail("classify reads image or audio, not text")

    def needs(self) -> list[str]:
        return [*self.inputs, "label"]

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        logits = model.classify_logits(media_of(batch, self.inputs, rows))
        return model.heads["classify"].loss(logits, batch.label[rows], reduction="sum")
