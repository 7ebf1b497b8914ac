"""Transfer: freeze parameter groups by name, and LoRA adapters (through `peft`) with adapter-only save and merge.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model stays a `MultimodalModel`:
every API method, `save_pretrained` and the trainer work unchanged on it. peft is imported by the functions
that use it (it imports transformers: seconds), so importing this module, and the trainer, does not pay for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from mmfm.errors import CheckpointError, ConfigError
from mmfm.train.config import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

_BACKBONE_TARGETS = r"backbone\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_up|down))"
_ENCODER_TARGETS = r"encoders\.(image|audio)\..*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def parameter_groups(model: nn.Module) -> list[str]:
    """Names `freeze` accepts: every module group and its members ("encoders", "encoders.image", ...)."""
    names = ["token_embedding"]
    for group in ("encoders", "projectors", "towers", "heads"):
        names.append(group)
        names.extend(f"{group}.{k}" for k in getattr(model, group))
    names.append("backbone")
    return names


def freeze(model: nn.Module, groups: list[str]) -> int:
    """Stops gradients for every parameter under the named groups; returns how many tensors were frozen.

    A tied weight (the caption head shares the text embedding) is frozen if any of its owners is.
    """
    valid = parameter_groups(model)
    unknown = [g for g in groups if g not in valid]
    if unknown:
        raise ConfigError(f"finetune.freeze: unknown group(s) {unknown}; this model has: {', '.join(valid)}")
    frozen = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if any(name == g or name.startswith(g + ".") for g in groups) and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Injects LoRA adapters on the backbone's (and optionally the media encoders') attention and MLP projections.

    Everything else in the adapted parts (weights, norms) is frozen, so only the adapters train there;
    projectors, heads and the text embedding train unless frozen by `freeze`. Returns the same model object.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = _BACKBONE_TARGETS if not config.encoders else f"({_BACKBONE_TARGETS})|({_ENCODER_TARGETS})"
    peft_config = PeftLoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets
    )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    inject_adapter_in_model(peft_config, model)  # peft freezes every non-adapter parameter of the model
    adapted = ("backbone.", "encoders.image.", "encoders.audio.") if config.encoders else ("backbone.",)
    for name, param in model.named_parameters():
        if "lora_" not in name:
            param.requires_grad_(id(param) in trainable and not name.startswith(adapted))
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


def save_adapter(model: nn.Module, directory: str | Path, config: LoraConfig) -> Path:
    """Writes only the adapter weights (`adapter_model.safetensors`) and their settings (`adapter_config.json`)."""
    from peft import get_peft_model_state_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, directory / ADAPTER_WEIGHTS)
    settings = {"rank": config.rank, "alpha": config.alpha, "dropout": config.dropout, "encoders": config.encoders}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2))
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Injects adapters as saved by `save_adapter` into a model of the same architecture and loads them."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    try:
        settings = json.loads((directory / ADAPTER_CONFIG).read_text())
        state = load_file(directory / ADAPTER_WEIGHTS)
    except (OSError, json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{directory}: not a readable LoRA adapter directory ({e})") from None
    apply_lora(model, LoraConfig(**settings))
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise CheckpointError(f"{directory}: adapter weights that fit no layer: {', '.join(result.unexpected_keys)}")
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base layer and puts the plain layer back; the model's keys are as before."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model
