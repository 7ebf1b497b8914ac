"""Key-map helpers the model converters share: template renames, shape checks, position-embedding resampling.

A template map names keys with `{}` where a block index goes, as torchtitan's state-dict adapters do:

```python
rename(state, {"transformer.resblocks.{}.ln_1.weight": "blocks.{}.norm1.weight"}, "ViT-B-32.safetensors")
```
"""

from __future__ import annotations

import math
import re
from typing import TypeVar

from torch import Tensor

from mmfm.errors import CheckpointError

_INDEX = re.compile(r"\.(\d+)\.")
T = TypeVar("T")


def rename(state: dict[str, T], key_map: dict[str, str], source: str) -> dict[str, T]:
    """Renames every key of `state` through a template map (its values, tensors or anything else, are kept).

    A key's first `.N.` is abstracted to `.{}.` to look it up, and N is put back into the target template,
    so one entry covers every block.

    Args:
        state: source tensors.
        key_map: source key or template -> target key or template.
        source: the file the tensors came from, named in errors.

    Raises:
        CheckpointError: listing every key the map does not know (the file holds more, or another, model).
    """
    out, unknown = {}, []
    for key, tensor in state.items():
        index = _INDEX.search(key)
        template = key if index is None else key[: index.start()] + ".{}." + key[index.end() :]
        if key in key_map:
            out[key_map[key]] = tensor
        elif index is not None and template in key_map:
            out[key_map[template].format(index.group(1))] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{source}: {len(unknown)} keys this converter does not know: {', '.join(sorted(unknown))}"
        )
    return out


def check_shapes(expected: dict[str, tuple[int, ...]], state: dict[str, Tensor], source: str, what: str) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped key together, if there are any.

    Args:
        expected: key -> shape of the model the weights must fit.
        state: the (converted) weights.
        source: the file they came from.
        what: the model they were expected to be, e.g. "timm 'vit_base_patch16_224'".
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = [
        f"{name} keys ({len(keys)}): " + ", ".join(keys)
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source}: the weights are not those of {what}\n  " + "\n  ".join(problems))


def grid_of(pos_embed: Tensor, num_prefix_tokens: int) -> int | None:
    """The side of the square patch grid a (1, prefix + side * side, W) position embedding covers, or None."""
    side = math.isqrt(max(pos_embed.shape[1] - num_prefix_tokens, 0))
    return side if side * side == pos_embed.shape[1] - num_prefix_tokens else None


def resample_pos_embed(pos_embed: Tensor, grid: int, num_prefix_tokens: int, source: str) -> Tensor:
    """(1, prefix + g * g, W) -> (1, prefix + grid * grid, W): the patch rows resampled bicubically, as timm does.

    The prefix rows (class, register tokens) are kept as they are. Returns the input itself when the grid fits.

    Raises:
        CheckpointError: the rows after the prefix are no square grid.
    """
    old = grid_of(pos_embed, num_prefix_tokens)
    if old is None:
        raise CheckpointError(
            f"{source}: the position embedding has {pos_embed.shape[1]} rows, which is {num_prefix_tokens} prefix "
            "rows plus no square patch grid; only square grids can be resampled"
        )
    if old == grid:
        return pos_embed
    from timm.layers import resample_abs_pos_embed  # timm takes a second to import: only when resampling

    return resample_abs_pos_embed(pos_embed, new_size=[grid, grid], num_prefix_tokens=num_prefix_tokens)
