"""Reading outside checkpoints safely: safetensors memory-mapped, torch files only with `weights_only=True`.

Nothing a user hands us is ever unpickled with the full pickle machinery: `.pt`/`.pth`/`.bin`/`.ckpt`
files go through `torch.load(weights_only=True)`, whose restricted unpickler accepts tensors and plain
containers only, and refuses anything else before it runs.
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from mmfm.checkpoint import read_shard_index
from mmfm.errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts commonly nest the model's weights, tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")
# Weight files of a Hugging Face model directory, preferred first: (single file, shard index).
HF_WEIGHT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Reads a flat {name: tensor} dict from one weights file, on the CPU, memory-mapped where the format allows.

    `.safetensors` files are memory-mapped. `.pt`/`.pth`/`.bin`/`.ckpt` files are read with
    `torch.load(map_location="cpu", weights_only=True, mmap=True)` (without mmap for the legacy,
    non-zip format). A file with another suffix is recognised by its first bytes.

    Containers are unwrapped: a dict holding the weights under one of `CONTAINER_KEYS` ("state_dict",
    "model", "module", "model_state_dict"; the first present wins) next to other entries (optimizer,
    epoch, ...) yields that entry, and a `module.` prefix on every key (DistributedDataParallel) is
    removed. Nothing else is renamed.

    Raises:
        CheckpointError: naming the file, when it is missing, truncated or corrupt, holds anything but
            tensors, or needs Python objects that `weights_only` refuses to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file" + (" (it is a directory)" if path.is_dir() else ""))
    kind = _format_of(path)
    if kind == "safetensors":
        try:
            obj: Any = load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be read as safetensors; truncated or corrupt? ({e})") from None
    else:
        obj = _torch_load(path)
    return _flatten(obj, path)


def read_hf_state_dict(directory: str | Path) -> tuple[dict[str, Tensor], Path]:
    """Reads the weights of a Hugging Face `save_pretrained` directory, single-file or sharded.

    Prefers `model.safetensors` (or its shard index) over `pytorch_model.bin` (or its index). Only regular files
    inside `directory` are read: an index naming a file outside it or a non-regular file is refused
    (`mmfm.checkpoint.read_shard_index`).

    Returns:
        The state dict and the file (or index) it came from, for error messages.
    """
    directory = Path(directory)
    for single, index in HF_WEIGHT_FILES:
        if (directory / single).is_file():
            return read_state_dict(directory / single), directory / single
        if (directory / index).exists():
            state: dict[str, Tensor] = {}
            for name in read_shard_index(directory / index):
                state.update(read_state_dict(directory / name))
            return state, directory / index
    names = ", ".join(n for pair in HF_WEIGHT_FILES for n in pair)
    raise CheckpointError(f"{directory}: no weights file in this directory (looked for {names})")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        return "safetensors"
    raise CheckpointError(
        f"{path}: unrecognised weights format (expected {', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)})"
    )


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: a torch zip checkpoint without its central directory; truncated or corrupt?")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's note on raw pickles
            # mmap needs the zip format; legacy files are read into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        stopped_at = _refusal_reason(str(e))
        raise CheckpointError(
            f"{path}: refusing to unpickle: torch.load(weights_only=True) stopped at '{stopped_at}'. The file holds "
            "more than tensors and plain containers (Python objects, whose loading could run code), or is corrupt. "
            "Re-save the weights alone (a state dict), or as safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = type(e).__name__ if "weights_only" in first else first  # never torch's advice to unpickle it all
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint; truncated or corrupt? ({reason})"
        ) from None


def _refusal_reason(message: str) -> str:
    """What torch's weights-only unpickler refused, without the advice around it.

    torch's message suggests re-running with `weights_only=False`, which would run whatever the file holds; mmfm
    never quotes that advice: only the refused global, operand or class is kept.
    """
    found = re.search(r"unsupported (?:global|operand|class)[^\n]*?(?= was not|\. |\n|$)", message, re.IGNORECASE)
    if found and "weights_only" not in found.group(0):
        return found.group(0)
    return "an object that is not a tensor or a plain container"


def _flatten(obj: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    if not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is not None:
            obj = obj[inner]
    others = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if others:
        raise CheckpointError(
            f"{path}: entries that are not tensors ({len(others)}): {', '.join(others[:20])}"
            + (" ..." if len(others) > 20 else "")
            + f"; expected a flat state dict (or one nested under {', '.join(CONTAINER_KEYS)})"
        )
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)
