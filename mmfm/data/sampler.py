"""Deterministic, resumable sampling for map-style datasets, and a seeded train/validation split.

`EpochSampler` draws each epoch's order from its own `torch.Generator` seeded with (seed, epoch), so the order
depends on nothing else: not the global RNG, not the number of DataLoader workers, not how many epochs ran in
this process. That is what makes exact resume possible: restart at the same epoch, skip the samples already
seen (`set_start`), and the rest of the epoch comes out as it would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

# Draws are uniform over [0, 2**31): far more than any number of reference captions, and a Python int anywhere.
_DRAW_HIGH = 2**31


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(index, draw)` keys of one rank's share of a shuffled epoch.

    Every epoch the whole index range is permuted (or kept in order with `shuffle=False`) and each position gets a
    random `draw`, both from a generator seeded with (seed, epoch). Datasets use the draw for per-sample choices,
    such as which reference caption to train on. With `world_size > 1` the permutation is cut to a multiple of
    `world_size` (dropping at most `world_size - 1` items, different ones each epoch when shuffling) and rank r
    takes positions r, r + world_size, ...: the ranks' shares are disjoint and equally long. Each index keeps its
    draw whatever the world size.

    Args:
        num_items: the dataset's length.
        seed: the base seed; ranks of one run must share it.
        shuffle: permute the indices each epoch; False keeps them in order (draws stay random).
        rank: this process's rank.
        world_size: the number of ranks sharing the data.

    Raises:
        ValueError: `num_items` is not positive, fewer than `world_size`, or `rank` is outside `[0, world_size)`.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        if num_items < world_size or num_items < 1:
            raise ValueError(f"num_items ({num_items}) must be at least 1 and at least world_size ({world_size})")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.num_per_rank = num_items // world_size

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order the next iteration yields; moving to another epoch clears `set_start`."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skips this rank's first `start` samples of the current epoch, to resume it exactly.

        Only the current epoch is affected: `set_epoch` with another epoch starts that one from its beginning.
        Call it after `set_epoch`, with the number of samples (not batches) this rank already consumed.

        Raises:
            ValueError: `start` is negative or more than this rank's samples per epoch.
        """
        if not 0 <= start <= self.num_per_rank:
            raise ValueError(f"start must lie in [0, {self.num_per_rank}] (this rank's samples per epoch), got {start}")
        self.start = start

    def __len__(self) -> int:
        """The number of samples the next iteration yields: this rank's share, less those `set_start` skips."""
        return self.num_per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, draws = self.epoch_order()
        begin = self.rank + self.start * self.world_size
        end = self.num_per_rank * self.world_size
        for position in range(begin, end, self.world_size):
            index = int(order[position])
            yield index, int(draws[index])

    def epoch_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current epoch's full order (num_items,) of indices and the (num_items,) draws of each index."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        draws = torch.randint(0, _DRAW_HIGH, (self.num_items,), generator=generator)
        return order, draws


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random split of `range(n)` into train and validation indices.

    The same (n, val_fraction, seed) always gives the same split, on every machine and torch version that keeps
    `torch.randperm`'s stream.

    Args:
        n: the number of examples.
        val_fraction: the share held out, in [0, 1); the count is rounded, and at least 1 when the share is
            positive (and at most n - 1, so training keeps an example).
        seed: the split's seed.

    Returns:
        (train indices, validation indices), each sorted, disjoint, together `range(n)`.

    Raises:
        ValueError: `val_fraction` is outside [0, 1) or `n` is below 1.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    num_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 0))).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


def mix_seed(*values: int) -> int:
    """One 63-bit seed from several ints, so that nearby tuples such as (seed, epoch) give unrelated streams."""
    return int(np.random.SeedSequence([v % 2**64 for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)
