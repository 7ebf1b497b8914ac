"""Training checkpoints: a loadable model directory plus the trainer state beside it, written atomically.

```
RUN/checkpoints/step-000200/
    config.yaml  model.safetensors      # `mmfm.load` reads these (with LoRA, adapters are included)
    trainer_state.pt                    # optimizer, scheduler, mixer, RNG and data position
```

The trainer state is read with `torch.load(weights_only=True)`: tensors and plain containers only, nothing
arbitrary is ever unpickled.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from mmfm.checkpoint import save_pretrained
from mmfm.errors import CheckpointError

STATE_NAME = "trainer_state.pt"
_PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, model, trainer_state: dict, keep_last: int) -> Path:
    """Writes `step-NNNNNN/` under a temporary name, renames it into place, then prunes to `keep_last`.

    A run killed mid-save leaves only a `.tmp` folder, which is never read and is replaced next time.
    """
    root = checkpoint_dir(run_dir)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    torch.save(trainer_state, tmp / STATE_NAME)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


# What every trainer state holds: key -> (type, what it is). Checked on load, so that an incomplete or foreign
# file is one clear error instead of a KeyError or a failed `load_state_dict` halfway through the restore.
STATE_KEYS: dict[str, tuple[type, str]] = {
    "step": (int, "the optimizer steps done"),
    "epoch": (int, "the data epoch"),
    "epoch_batches": (int, "the micro-batches of that epoch done"),
    "optimizer": (dict, "the optimizer state"),
    "scheduler": (dict, "the learning-rate schedule state"),
    "mixer": (dict, "the task mixer state"),
    "rng": (list, "each rank's RNG state"),
}


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state of a checkpoint directory, checked to hold every part resume restores.

    Raises:
        CheckpointError: the file is missing, not a regular file, truncated or corrupt, or lacks a part (or
            holds one of the wrong type); the message names the file and the parts.
    """
    file = Path(path) / STATE_NAME
    if not file.exists():
        raise CheckpointError(f"{path}: no {STATE_NAME}; not a training checkpoint (only model weights?)")
    if not file.is_file():
        raise CheckpointError(f"{file}: not a regular file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or unsafe files
        raise CheckpointError(f"{file}: cannot read the trainer state; truncated or corrupt? ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a trainer state (a dict)")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        parts = ", ".join(f"'{key}' ({STATE_KEYS[key][1]})" for key in missing)
        raise CheckpointError(
            f"{file}: incomplete trainer state, it has no {parts}; it was not written by mmfm's trainer, or "
            "was cut short. Resume from an earlier checkpoint (delete this one), or train anew from its weights "
            f"(model={path}) in another out_dir"
        )
    for key, (kind, what) in STATE_KEYS.items():
        value = state[key]
        wrong = not isinstance(value, kind) or isinstance(value, bool)
        if kind is int and not wrong and value < 0:
            wrong = True
        if kind is list and not wrong:
            wrong = not value or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in value)
        if wrong:
            raise CheckpointError(f"{file}: '{key}' ({what}) is {_describe(value)}; the trainer state is corrupt")
    return state


def _describe(value: object) -> str:
    if isinstance(value, (bool, int, float)):
        return f"{type(value).__name__} {value}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
