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


def load_trainer_state(path: str | Path) -> dict:
    """The trainer state of a checkpoint directory; errors name the file."""
    file = Path(path) / STATE_NAME
    if not file.exists():
        raise CheckpointError(f"{path}: no {STATE_NAME}; not a training checkpoint (only model weights?)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or unsafe files
        raise CheckpointError(f"{file}: cannot read the trainer state; truncated or corrupt? ({e})") from None
