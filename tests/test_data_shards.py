"""Webdataset shards: a manifest round-trips through them, and ranks x workers see every example exactly once."""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mmfm
from mmfm.data import Collator, ManifestDataset, ShardDataset, write_shards
from mmfm.errors import InputError


@pytest.fixture(scope="module")
def model() -> mmfm.MultimodalModel:
    return mmfm.create_model("mmfm-test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ManifestDataset:
    """Ten examples: PNG, JPEG and FLAC media, a text-only line, single and multiple captions, some audio captions."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(9):
        image = f"{i}.jpg" if i % 3 == 0 else f"{i}.png"
        audio = f"{i}.flac" if i % 2 else f"{i}.wav"
        Image.fromarray(rng.integers(0, 256, (12, 10 + i, 3), dtype=np.uint8)).save(root / image)
        soundfile.write(root / audio, 0.1 * rng.standard_normal(3000 + 500 * i), 16000)
        lines.append({"image": image, "audio": audio, "caption": [f"a{i}", f"b{i}", f"c{i}"], "label": str(i % 4)})
        if i % 3:
            lines[-1]["audio_caption"] = [f"sound {i}", f"noise {i}"][: i % 3]
    lines.append({"text": "only text", "id": "t"})
    (root / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return ManifestDataset(root / "m.jsonl")


@pytest.fixture(scope="module")
def shards(dataset: ManifestDataset, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_shards(dataset, tmp_path_factory.mktemp("out") / "sub" / "train-%03d.tar", max_count=4)


def test_shards_round_trip_fields_and_processed_media(model, dataset, shards):
    assert [p.name for p in shards] == ["train-000.tar", "train-001.tar", "train-002.tar"]
    items = list(ShardDataset(shards))
    assert [item["index"] for item in items] == list(range(10))  # no shuffling: shard order
    collate = Collator.from_model(model)
    for item in items:
        expected = dataset[item["index"]]
        for key in ("caption", "audio_caption"):
            assert item.get(f"{key}s") == expected.get(f"{key}s")
            assert item.get(key) in (expected.get(f"{key}s") or [None])
        for key in ("label", "text", "id"):
            assert item.get(key) == expected.get(key)
        assert isinstance(item.get("image", Image.new("L", (1, 1))), Image.Image)
        got, want = collate([item]), collate([expected])
        for field in ("image", "audio"):
            if getattr(want, field) is None:
                assert getattr(got, field) is None
            else:
                torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    # a brace pattern names the same shards
    pattern = str(shards[0]).replace("000", "{000..002}")
    assert [item["index"] for item in ShardDataset(pattern)] == list(range(10))


@pytest.mark.parametrize("max_count", [2, 100], ids=["5 shards: dealt out", "1 shard: split by example"])
def test_two_workers_and_two_ranks_see_every_example_exactly_once(dataset, tmp_path, max_count):
    paths = write_shards(dataset, tmp_path / "s-%02d.tar", max_count=max_count)
    seen: Counter[int] = Counter()
    per_rank = []
    for rank in range(2):
        data = ShardDataset(paths, shuffle_buffer=3, seed=1, rank=rank, world_size=2)
        loader = DataLoader(data, batch_size=None, num_workers=2)
        indices = [item["index"] for item in loader]
        per_rank.append(indices)
        seen.update(indices)
    assert seen == Counter(range(10))
    assert all(per_rank)
    loader = DataLoader(ShardDataset(paths), batch_size=None, num_workers=2)
    assert Counter(item["index"] for item in loader) == Counter(range(10))


def test_shuffling_is_seeded_per_epoch(shards):
    def order(seed: int, epoch: int) -> list[int]:
        data = ShardDataset(shards, shuffle_buffer=4, seed=seed)
        data.set_epoch(epoch)
        return [item["index"] for item in data]

    first = order(0, 0)
    assert sorted(first) == list(range(10)) and first != list(range(10))
    assert order(0, 0) == first
    assert order(0, 1) != first
    assert order(1, 0) != first


def test_bad_patterns_and_missing_shards_are_named(dataset, tmp_path):
    with pytest.raises(InputError, match="needs one printf-style number field"):
        write_shards(dataset, tmp_path / "train.tar")
    with pytest.raises(InputError, match="shard '.*missing-0.tar' not found"):
        ShardDataset(str(tmp_path / "missing-{0..1}.tar"))


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A shard written by hand, as another tool (or an older mmfm) might have written it."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_shard_caption_string_is_one_caption_and_an_int_label_is_a_str_as_in_a_manifest(tmp_path):
    meta = {"index": 0, "caption": "a seven", "label": 7, "text": "words"}
    shard = write_tar(tmp_path / "s.tar", {"00000000.json": json.dumps(meta).encode()})
    (tmp_path / "m.jsonl").write_text(json.dumps({k: v for k, v in meta.items() if k != "index"}) + "\n")
    expected = ManifestDataset(tmp_path / "m.jsonl")[0]
    (item,) = list(ShardDataset(shard))
    assert item["caption"] == "a seven" and item["captions"] == ["a seven"]  # not 'a', ' ', 's', ...
    assert item["label"] == "7"
    assert item == expected


@pytest.mark.parametrize(
    "meta,problem",
    [
        (b'{"index": 0, "caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"index": 0, "caption": "bad \\ud800"}', "caption holds a lone surrogate U+D800"),
        (b'{"index": 0, "caption": []}', "caption is an empty list"),
        (b'{"index": 0, "label": 1.5, "caption": "x"}', "label must be a string or an int, got the number 1.5"),
        (b'{"index": true, "caption": "x"}', "no integer 'index'"),
        (b'{"index": 0, "caption": "caf\xe9"}', "not UTF-8"),
    ],
    ids=["nested", "surrogate", "empty captions", "float label", "bool index", "latin-1"],
)
def test_a_bad_json_member_is_an_input_error_naming_the_shard_and_example(tmp_path, meta, problem):
    shard = write_tar(tmp_path / "s.tar", {"00000000.json": meta})
    with pytest.raises(InputError, match=rf"s\.tar: example 00000000: .*{re.escape(problem)}"):
        list(ShardDataset(shard))


def test_a_decompression_bomb_in_a_shard_is_an_input_error(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30_000, 30_000, 1, 0, 0, 0, 0)  # a 900 M pixel bilevel PNG, pixels left out
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    members = {"00000000.json": b'{"index": 0, "caption": "x"}', "00000000.png": png}
    shard = write_tar(tmp_path / "s.tar", members)
    with pytest.raises(InputError, match=r"s\.tar: example 00000000: not a readable image"):
        list(ShardDataset(shard))
