"""Training objectives: each turns a batch into a *sum* of per-unit losses and says how many units it holds.

The trainer divides the summed loss by the units of the whole optimizer step (every micro-batch on every
rank), so one rank with batch B, two ranks with B/2 each, and gradient accumulation all optimise the same
mean. A unit is a predicted token for captioning and an example for the other objectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor

from mmfm.data import Batch
from mmfm.errors import ConfigError
from mmfm.train.config import TaskConfig


class Objective:
    """A training objective over the batch rows that carry every modality it reads."""

    def __init__(self, task: TaskConfig):
        self.task = task
        self.inputs = list(task.inputs)

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


class CaptionObjective(Objective):
    """Next-token loss of the caption given the `inputs` media; no inputs is a text-only LM over `text`."""

    def needs(self) -> list[str]:
        return [*self.inputs, "caption" if self.inputs else "text"]

    def target(self, batch: Batch, rows: Tensor) -> tuple[Tensor, Tensor]:
        if self.inputs:
            return batch.caption_ids[rows], batch.caption_mask[rows]
        return batch.text_ids[rows], batch.text_mask[rows]

    def units(self, batch: Batch) -> Tensor:
        _, mask = self.target(batch, self.rows(batch))
        return mask[:, 1:].sum()

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        ids, mask = self.target(batch, rows)
        return model.caption_loss(media_of(batch, self.inputs, rows), ids, mask, reduction="sum")


class ClassifyObjective(Objective):
    """Cross-entropy of the trained classification head over one media modality."""

    def needs(self) -> list[str]:
        return [*self.inputs, "label"]

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        logits = model.classify_logits(media_of(batch, self.inputs, rows))
        return model.heads["classify"].loss(logits, batch.label[rows], reduction="sum")


class ContrastiveObjective(Objective):
    """Symmetric InfoNCE between two modalities; under torchrun every rank's pairs are negatives for all.

    Embeddings are all-gathered with gradients (`torch.distributed.nn`), so two ranks with B/2 pairs each
    compute exactly the loss one rank computes on the B pairs.
    """

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


class DenoiseObjective(Objective):
    """The diffusion head's denoising loss on the example's image, conditioned on the `inputs` modality."""

    def needs(self) -> list[str]:
        return ["image", *[("caption" if m == "text" else m) for m in self.inputs]]

    def loss_sum(self, model, batch: Batch, across_ranks: bool = False) -> Tensor:
        rows = self.rows(batch)
        (source,) = self.inputs
        if source == "text":
            media, ids, mask = {}, batch.caption_ids[rows], batch.caption_mask[rows]
        else:
            media, ids, mask = media_of(batch, [source], rows), None, None
        target = model.image_gen_targets(batch.image[rows])
        return model.image_gen_loss(media, ids, mask, target, reduction="sum")


OBJECTIVE_CLASSES = {
    "caption": CaptionObjective,
    "classify": ClassifyObjective,
    "contrastive": ContrastiveObjective,
    "denoise": DenoiseObjective,
}

_REQUIRED_HEAD = {"caption": "caption", "classify": "classify", "contrastive": "contrastive", "denoise": "image_gen"}


def build_objective(task: TaskConfig, model) -> Objective:
    """The objective of a task, after checking the model has the head and encoders it needs."""
    head = _REQUIRED_HEAD[task.objective]
    if head not in model.heads:
        raise ConfigError(
            f"task '{task.name}' ({task.objective}) needs the model's '{head}' head, but the model has: "
            f"{', '.join(model.heads) or 'no heads'}; set model_overrides.{head} or use a model config that has it"
        )
    for m in task.inputs:
        if m != "text" and m not in model.encoders:
            raise ConfigError(f"task '{task.name}' reads {m}, but the model has no {m} encoder")
    return OBJECTIVE_CLASSES[task.objective](task)
