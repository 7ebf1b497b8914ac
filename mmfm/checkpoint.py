"""mmfm's own checkpoint format: `config.yaml` + `model.safetensors` (or shards with an index), nothing pickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmfm.config import ModelConfig
from mmfm.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def unique_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with tied tensors kept once, under the first key that holds them."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:
            seen.add(ident)
            out[key] = tensor
    return out


def save_pretrained(model: nn.Module, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes the model's config and weights into `directory`.

    Weights larger than `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` files with a
    `model.safetensors.index.json` weight map (the Hugging Face layout). Every file is written under a
    temporary name and renamed into place, so an interrupted save never leaves a half-written file behind.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        _atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        _atomic_write(directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic_write(directory / CONFIG_NAME, model.config.save)
    written = set(names) | ({INDEX_NAME} if len(shards) > 1 else set())
    for stale in (*directory.glob("model*.safetensors"), directory / INDEX_NAME):  # left by an earlier save
        if stale.exists() and stale.name not in written:
            stale.unlink()


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    """Reads (memory-mapped) every tensor of a saved model, single-file or sharded."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.exists():
        return _read_safetensors(single)
    if not index.exists():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (nor a sharded {INDEX_NAME}) in the checkpoint")
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    state = {}
    for name in files:
        state.update(_read_safetensors(directory / name))
    return state


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str, strict: bool = True) -> list[str]:
    """Copies `state` into `model`, checking every key first.

    Missing, unexpected and mis-shaped keys are reported together in one `CheckpointError`. With
    `strict=False`, missing and unexpected keys are allowed (mis-shaped ones never are) and returned
    as warnings.
    """
    expected = {k: tuple(v.shape) for k, v in unique_state_dict(model).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    problems = []
    if misshaped:
        problems.append(f"mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped))
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(
            f"{source}: the weights do not fit this model (a checkpoint of another architecture or config?)\n  "
            + "\n  ".join(problems)
        )
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]


def load_pretrained(directory: str | Path, strict: bool = True) -> nn.Module:
    """Builds the model described by `directory/config.yaml` and loads its weights; returns it in eval mode."""
    from mmfm.model import MultimodalModel

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME} in the checkpoint")
    try:
        config = ModelConfig.from_file(config_path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    state = read_weights(directory)
    model = MultimodalModel(config)
    load_weights(model, state, str(directory), strict=strict)
    return model.eval()


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors; truncated or corrupt? ({e})") from None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)
