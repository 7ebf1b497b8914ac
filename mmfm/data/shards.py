"""Webdataset tar shards: write a manifest's examples into shards, and stream them back as dataset items.

Each example is stored under an 8-digit key (its manifest index) as up to three tar members, the JSON one holding
the fields the example has:

```
00000017.png     the image file's bytes, under its own extension (.png, .jpg, ...)
00000017.wav     the audio file's bytes (.wav, .flac, ...)
00000017.json    {"index": 17, "caption": [...], "audio_caption": [...], "text": ..., "label": ..., "id": ...}
```

`ShardDataset` is an `IterableDataset`: it streams shards in order, so it cannot jump to an example. Resuming a
run mid-epoch therefore replays the epoch from its start; exact resume (`EpochSampler.set_start`) is for map-style
datasets such as `ManifestDataset`. webdataset is imported by the functions that use it, so `import mmfm.data`
does not pay for it.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mmfm.data.manifest import (
    AUDIO_EXTENSIONS,
    CAPTION_KEYS,
    IMAGE_EXTENSIONS,
    make_item,
    parse_fields,
    parse_json_object,
)
from mmfm.data.sampler import mix_seed
from mmfm.errors import InputError

_KEY_DIGITS = 8


def write_shards(dataset: Any, pattern: str | Path, max_count: int = 1000) -> list[Path]:
    """Writes a dataset's examples into webdataset tar shards, in index order.

    Args:
        dataset: a `ManifestDataset` (or any map-style dataset of the same item dicts, media given as paths).
        pattern: the shard path with a printf-style number, e.g. "shards/train-%05d.tar"; its directory is created.
        max_count: most examples per shard.

    Returns:
        The paths of the shards written, in order.

    Raises:
        InputError: `pattern` has no `%d`-style field, or a media file has an extension the reader would not
            recognise; the message names it.
    """
    import webdataset as wds

    pattern = str(pattern)
    try:
        first, second = pattern % 0, pattern % 1
    except (TypeError, ValueError):
        first = second = None
    if first is None or first == second:
        raise InputError(f"shard pattern {pattern!r} needs one printf-style number field, e.g. 'train-%05d.tar'")
    if max_count < 1:
        raise ValueError(f"max_count must be at least 1, got {max_count}")
    Path(first).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    # mtime fixed so that the same dataset always gives byte-identical shards.
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0, post=lambda f: written.append(Path(f)), mtime=0) as w:
        for i in range(len(dataset)):
            w.write(_to_sample(dataset[i]))
    return written


class ShardDataset(IterableDataset):
    """Streams the examples of webdataset shards as the same item dicts `ManifestDataset` returns.

    Media come decoded: `image` is a PIL image, `audio` a `(waveform, sample_rate)` pair with a float32 numpy
    waveform ((T,) mono, (T, C) otherwise), which the model's processors (and `Collator`) accept. Each example
    with several reference captions (or audio captions) trains on one picked by a draw seeded with (seed, epoch,
    index).

    Every example is seen once per epoch across all DDP ranks and DataLoader workers together: with at least as
    many shards as ranks x workers, the shards are dealt out among them; with fewer, every worker reads all
    shards and keeps every (ranks x workers)-th example. Shares can differ by a shard's worth of examples, so under
    DDP use a number of equally sized shards divisible by ranks x workers, or stop each epoch at a fixed number
    of steps, lest one rank wait for another that has run out.

    With `shuffle_buffer > 0` the shard order is shuffled each epoch by (seed, epoch), the same on every rank, and
    examples pass through a shuffle buffer of that size seeded by (seed, epoch, rank, worker). With 0 the examples
    come in shard order. Call `set_epoch` before each epoch; it reaches the workers because a DataLoader without
    `persistent_workers` copies the dataset into them at every epoch.

    This dataset cannot seek: resuming mid-epoch replays the epoch from its start. Exact resume
    (`EpochSampler.set_start`) is for map-style datasets such as `ManifestDataset`.

    Args:
        urls: a shard path or URL, a brace pattern such as "shards/train-{00000..00009}.tar", or a list of them.
        shuffle_buffer: examples held for shuffling; 0 disables shuffling.
        seed: the shuffling and caption-draw seed; ranks of one run must share it.
        rank: this process's rank; None takes it from `torch.distributed` when initialised (else 0). Build the
            dataset after `init_process_group`.
        world_size: the number of ranks; None as for `rank`.

    Raises:
        InputError: no shard is named, or a local shard file does not exist.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        import webdataset as wds

        super().__init__()
        if isinstance(urls, (str, Path)):
            self.urls = wds.shardlists.expand_urls(str(urls))
        else:
            self.urls = [str(u) for u in urls]
        if not self.urls:
            raise InputError("ShardDataset needs at least one shard")
        for url in self.urls:
            if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
                raise InputError(f"shard {url!r} not found")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be 0 or more, got {shuffle_buffer}")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={self.rank}, world_size={self.world_size}")
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose shard order, shuffle and caption draws the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker_id
        urls = list(self.urls)
        if self.shuffle_buffer:
            random.Random(mix_seed(self.seed, self.epoch)).shuffle(urls)
        split_shards = len(urls) >= slots
        mine = urls[slot::slots] if split_shards else urls
        samples: Iterator[dict[str, Any]] = wds.tarfile_to_samples()(iter([{"url": u} for u in mine]))
        if not split_shards:
            samples = (s for k, s in enumerate(samples) if k % slots == slot)
        if self.shuffle_buffer:
            rng = random.Random(mix_seed(self.seed, self.epoch, slot + 1))
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            yield self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        where = f"{sample.get('__url__')}: example {sample.get('__key__')}"
        if "json" not in sample:
            raise InputError(f"{where}: has no .json member (shards are written by mmfm.data.write_shards)")
        try:
            meta = parse_json_object(sample["json"])
            # The same checks as a manifest line: a caption string is one caption, an int label becomes its str.
            record = parse_fields(meta)
        except InputError as e:
            raise InputError(f"{where}: the .json member: {e}") from None
        index = meta.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise InputError(f"{where}: the .json member has no integer 'index' (shards are written by write_shards)")
        for name, data in sample.items():
            if name.startswith("__") or name == "json":
                continue
            suffix = "." + name
            if suffix in IMAGE_EXTENSIONS:
                record["image"] = _decode_image(data, where)
            elif suffix in AUDIO_EXTENSIONS:
                record["audio"] = _decode_audio(data, where)
        return make_item(index, record, mix_seed(self.seed, self.epoch, index))


def _to_sample(item: dict[str, Any]) -> dict[str, Any]:
    """The tar members of one item: media file bytes under their extensions, the rest in a JSON member."""
    index = int(item["index"])
    sample: dict[str, Any] = {"__key__": f"{index:0{_KEY_DIGITS}d}"}
    for modality, known in (("image", IMAGE_EXTENSIONS), ("audio", AUDIO_EXTENSIONS)):
        if modality not in item:
            continue
        path = Path(item[modality])
        if path.suffix.lower() not in known:
            raise InputError(
                f"example {index}: {modality} {str(path)!r} has an extension shards do not support "
                f"(supported: {' '.join(known)})"
            )
        sample[path.suffix.lower().lstrip(".")] = path.read_bytes()
    meta: dict[str, Any] = {"index": index}
    for key in ("text", "label", "id"):
        if key in item:
            meta[key] = item[key]
    for key, all_key in CAPTION_KEYS.items():
        if all_key in item:
            meta[key] = item[all_key]
    sample["json"] = json.dumps(meta).encode("utf-8")
    return sample


def _decode_image(data: bytes, where: str) -> Image.Image:
    try:
        # the header only: the image processor checks its size against its pixel limit before decoding it
        return Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{where}: not a readable image ({e})") from None


def _decode_audio(data: bytes, where: str) -> tuple[np.ndarray, int]:
    try:
        waveform, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32")  # (T,) or (T, C)
    except (RuntimeError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise InputError(f"{where}: not a readable audio file ({e})") from None
    return waveform, sample_rate
