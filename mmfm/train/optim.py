"""AdamW parameter groups (per component learning rates; no decay on norms, biases, embeddings and learned tokens)
and warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

from mmfm.train.config import LR_COMPONENTS, OptimConfig

# The module groups of each learning-rate component (`OptimConfig.component_lr`) but "lora", which is found by name.
COMPONENTS = {
    "encoders": ("encoders", "towers"),
    "projectors": ("projectors",),
    "backbone": ("backbone", "token_embedding"),
    "heads": ("heads",),
}


def component_of(name: str) -> str:
    """The learning-rate component of a parameter name (wrapper prefixes such as "model." or "module." are skipped):
    "lora" for LoRA adapter weights, else the group its module belongs to (`COMPONENTS`)."""
    if "lora_" in name:
        return "lora"
    for part in name.split("."):
        for component, groups in COMPONENTS.items():
            if part in groups:
                return component
    raise ValueError(f"parameter {name!r} belongs to no learning-rate component ({', '.join(LR_COMPONENTS)})")


def param_groups(model: nn.Module, weight_decay: float, component_lr: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: per learning-rate component, decay for the weights of linear and convolution layers and none
    for everything else.

    "Everything else" is norms, biases, token/position embeddings (including the LM head tied to the token
    embedding), class/register tokens, learned queries and the contrastive temperature. Frozen parameters
    are left out, and so are empty groups. Without `component_lr` there are two groups, "decay" and "no_decay";
    with it, one pair per component ("projectors/decay", ..., as nanoVLM gives its projector and backbones their
    own rates), each with its component's `lr` where `component_lr` names one (others keep the optimizer's).
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(m.weight) not in embeddings
    }
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        kind = "decay" if id(p) in decay_ids else "no_decay"
        component = None if component_lr is None else component_of(name)
        key = kind if component is None else f"{component}/{kind}"
        if key not in groups:
            groups[key] = {"name": key, "params": [], "weight_decay": weight_decay * (kind == "decay")}
            if component in (component_lr or {}):
                groups[key]["lr"] = component_lr[component]
        groups[key]["params"].append(p)
    if component_lr is None:  # the two groups always exist, as optimizer state of earlier runs expects
        for kind in ("decay", "no_decay"):
            groups.setdefault(kind, {"name": kind, "params": [], "weight_decay": weight_decay * (kind == "decay")})
        return [groups["decay"], groups["no_decay"]]
    return list(groups.values())


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, config.weight_decay, config.component_lr or None)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def warmup_cosine(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int):
    """Linear warmup to `lr`, then a cosine down to `lr * min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
