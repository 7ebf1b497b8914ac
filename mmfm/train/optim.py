"""AdamW parameter groups (no decay on norms, biases, embeddings and learned tokens) and warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmfm.train.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for the weights of linear and convolution layers, none for everything else.

    "Everything else" is norms, biases, token/position embeddings (including the LM head tied to the token
    embedding), class/register tokens, learned queries and the contrastive temperature. Frozen parameters
    are left out.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(m.weight) not in embeddings
    }
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """Linear warmup to `lr`, then a cosine down to `lr * min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
