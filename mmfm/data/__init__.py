"""Datasets, sampling and batching: from files on disk (or tar shards) to the tensors a model trains on.

A dataset yields item dicts (`index`, and any of `image`, `audio`, `text`, `caption`, `captions`, `audio_caption`,
`audio_captions`, `label`); `EpochSampler` orders them reproducibly per epoch and rank; `Collator` processes and
pads a list of items into a `Batch` with a presence mask per modality.

```python
import torch
import mmfm
from mmfm.data import Collator, EpochSampler, ManifestDataset, cache_media, write_digits

model = mmfm.create_model("mmfm-test")
root = write_digits("digits/")                                 # 1,797 images + tones, train/val manifests
train = cache_media(ManifestDataset(root / "train.jsonl"), model.processors)
sampler = EpochSampler(len(train), seed=0)
loader = torch.utils.data.DataLoader(train, batch_size=32, sampler=sampler, collate_fn=Collator.from_model(model))
for epoch in range(2):
    sampler.set_epoch(epoch)
    for batch in loader:
        media = {"image": batch.image}                         # (B, C, H, W)
        loss = model.caption_loss(media, batch.caption_ids, batch.caption_mask)
```
"""

from mmfm.data.cache import CachedMediaDataset, cache_media
from mmfm.data.collate import Batch, Collator
from mmfm.data.digits import dtmf_tone, write_digits
from mmfm.data.digits_chat import write_digits_chat
from mmfm.data.manifest import ImageFolderDataset, ManifestDataset
from mmfm.data.sampler import EpochSampler, split_indices
from mmfm.data.shards import ShardDataset, write_shards
from mmfm.data.speech import speak

__all__ = [
    "Batch",
    "CachedMediaDataset",
    "Collator",
    "EpochSampler",
    "ImageFolderDataset",
    "ManifestDataset",
    "ShardDataset",
    "cache_media",
    "dtmf_tone",
    "speak",
    "split_indices",
    "write_digits",
    "write_digits_chat",
    "write_shards",
]
