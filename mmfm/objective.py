"""What every training objective is: a batch in, a *sum* of per-unit losses out, and how many units it held.

The trainer divides the summed loss by the units of the whole optimizer step (every micro-batch on every
rank), so one rank with batch B, two ranks with B/2 each, and gradient accumulation all optimise the same
mean. A unit is a predicted token for captioning and an example for the other objectives. Each head's file
holds the objectives it serves (`mmfm.config.HEADS`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmfm.data import Batch


class Objective:
    """A training objective over the batch rows that carry every modality it reads.

    Args:
        task: the recipe's task (`mmfm.train.TaskConfig`): its name, objective and `inputs`.
    """

    def __init__(self, task: Any):
        self.task = task
        self.inputs = list(task.inputs)

    @classmethod
    def check_inputs(cls, inputs: Sequence[str], fail: Callable[[str], None]) -> None:
        """Calls `fail` with a message when the objective cannot read these input modalities."""

    def rows(self, batch: Batch) -> Tensor:
        """(B,) bool: the rows this objective can use."""
        ok = torch.ones(len(batch), dtype=torch.bool, device=batch.index.device)
        for m in self.needs():
            ok &= batch.label >= 0 if m == "label" else getattr(batch, f"has_{m}")
        return ok

    def needs(self) -> list[str]:
        """Batch fields (as in `Batch.has_<field>`) a row must have."""
        raise NotImplementedError

    def units(self, batch: Batch) -> Tensor:
        """How many loss units this micro-batch holds (a 0-dim integer tensor)."""
        return self.rows(batch).sum()

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        """The sum of per-unit losses over the usable rows.

        `across_ranks` (the trainer under torchrun) lets an objective whose loss couples examples, like
        InfoNCE, see every rank's examples; evaluation on one rank leaves it off.
        """
        raise NotImplementedError


def media_of(batch: Batch, modalities: list[str], rows: Tensor) -> dict[str, Tensor]:
    """{modality: tensor} of the batch's processed media, restricted to `rows`."""
    return {m: getattr(batch, m)[rows] for m in modalities}
