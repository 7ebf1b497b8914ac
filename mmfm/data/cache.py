"""Decode and preprocess a small dataset's media once, up front, and keep the tensors in memory.

Small datasets (the digits demo, a few thousand clips) spend most of a training step decoding files and computing
fbanks that never change; `cache_media` does that work once. Per-sample choices (which caption) are still made by
the wrapped dataset, per key, so sampling behaves exactly as without the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmfm.data.collate import MEDIA, process_media


class CachedMediaDataset(Dataset):
    """A map-style dataset whose items carry processed media tensors in place of paths; see `cache_media`.

    Attributes:
        dataset: the wrapped dataset.
        media: per modality, the (N, ...) processed tensors of all items (zeros where an item has none).
        present: per modality, the (N,) bool mask of items that have it.
        conversation_media: per modality, the processed tensor of every file conversations name (by path, each
            file processed once however many conversations use it).
    """

    def __init__(self, dataset: Any, processors: dict[str, Any]) -> None:
        self.dataset = dataset
        self.media: dict[str, Tensor] = {}
        self.present: dict[str, Tensor] = {}
        self.conversation_media: dict[str, dict[str, Tensor]] = {m: {} for m in MEDIA if m in processors}
        rows: dict[str, dict[int, Tensor]] = {m: {} for m in MEDIA if m in processors}
        for i in range(len(dataset)):
            item = dataset[i]
            for modality, found in rows.items():
                if item.get(modality) is not None:
                    found[i] = process_media(modality, processors[modality], item[modality], item["index"])
                files = self.conversation_media[modality]
                for path in item.get("media", {}).get(modality, []):
                    if path not in files:
                        files[path] = process_media(modality, processors[modality], path, item["index"])
        for modality, found in rows.items():
            if not found:
                continue
            first = next(iter(found.values()))
            stacked = first.new_zeros((len(dataset), *first.shape))  # (N, C, H, W) or (N, frames, mel)
            present = torch.zeros(len(dataset), dtype=torch.bool)
            for i, tensor in found.items():
                stacked[i] = tensor
                present[i] = True
            self.media[modality] = stacked
            self.present[modality] = present

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        """The wrapped dataset's item for `key` (an index or `(index, draw)` pair), media replaced by tensors."""
        item = self.dataset[key]
        index = item["index"]
        for modality, stacked in self.media.items():
            if self.present[modality][index]:
                item[modality] = stacked[index]
        if "media" in item:
            cached = self.conversation_media
            item["media"] = {m: [cached.get(m, {}).get(p, p) for p in paths] for m, paths in item["media"].items()}
        return item


def cache_media(dataset: Any, processors: dict[str, Any]) -> CachedMediaDataset:
    """Runs every item's image and audio through `processors` once and keeps the results in memory.

    Items come back as the wrapped dataset makes them, with `image`/`audio` replaced by the processed (C, H, W) or
    (frames, mel) tensor; a `Collator` uses such tensors as they are. Memory is N times one processed item per
    modality (the digits demo with mmfm-tiny: about 25 MB of pixels and 60 MB of fbanks); a conversation's media are
    kept once per file. Only media the processors
    cover are cached; others stay as paths. With DataLoader workers started by fork the tensors are shared, not
    copied.

    Args:
        dataset: a map-style dataset of item dicts with an `index` key, e.g. a `ManifestDataset`.
        processors: processors by modality, e.g. `model.processors`.

    Returns:
        The wrapping dataset; it takes the same keys as `dataset`.

    Raises:
        InputError: a medium cannot be loaded; the message names the item.
    """
    return CachedMediaDataset(dataset, processors)
