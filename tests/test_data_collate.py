"""Collator and cache_media: mixed items get the right masks, media equal the processors' output, workers agree."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mmfm
from mmfm.data import Batch, Collator, EpochSampler, ManifestDataset, cache_media
from mmfm.errors import InputError


@pytest.fixture(scope="module")
def model() -> mmfm.MultimodalModel:
    return mmfm.create_model("mmfm-test")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ManifestDataset:
    """Ten examples: 0 has everything, 1 no image and no caption, 2 no audio and no label, 3 only text; then more."""
    root = tmp_path_factory.mktemp("collate")
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (9 + i, 11, 3), dtype=np.uint8)).save(root / f"{i}.png")
        soundfile.write(root / f"{i}.wav", 0.1 * rng.standard_normal(2000 + 700 * i), 16000)
    lines = [
        {"image": "0.png", "audio": "0.wav", "caption": ["zero", "a longer zero caption", "nil"], "label": "3"},
        {"audio": "1.wav", "label": 7},
        {"image": "2.png", "caption": "two"},
        {"text": "plain text for language modelling"},
    ]
    lines += [
        {"image": f"{i}.png", "audio": f"{i}.wav", "caption": [f"c{i}", f"d{i}"], "label": str(i)} for i in range(4, 10)
    ]
    (root / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return ManifestDataset(root / "m.jsonl")


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for field in dataclasses.fields(Batch):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), field.name
        else:
            assert x == y, field.name


def test_mixed_items_get_masks_zeros_and_exactly_the_processor_output(model, dataset):
    collate = Collator.from_model(model)
    batch = collate([dataset[(0, 1)], dataset[1], dataset[2], dataset[3]])
    assert len(batch) == 4
    assert batch.index.tolist() == [0, 1, 2, 3]
    assert batch.has_image.tolist() == [True, False, True, False]
    assert batch.has_audio.tolist() == [True, True, False, False]
    assert batch.has_caption.tolist() == [True, False, True, False]
    assert batch.has_text.tolist() == [False, False, False, True]
    images = model.processors["image"]([dataset[0]["image"], dataset[2]["image"]])
    assert torch.equal(batch.image[[0, 2]], images)
    assert not batch.image[[1, 3]].any()
    audio = model.processors["audio"]([dataset[0]["audio"], dataset[1]["audio"]])
    assert torch.equal(batch.audio[[0, 1]], audio)
    assert not batch.audio[[2, 3]].any()
    # draw 1 picks the second reference of example 0
    ids, mask = model.tokenizer(["a longer zero caption", "two"], model.config.text.max_length)
    assert torch.equal(batch.caption_ids[[0, 2]], ids) and torch.equal(batch.caption_mask[[0, 2]], mask)
    assert not batch.caption_mask[[1, 3]].any()
    assert (batch.caption_ids[[1, 3]] == model.tokenizer.pad_id).all()
    ids, _ = model.tokenizer(["plain text for language modelling"], model.config.text.max_length)
    assert torch.equal(batch.text_ids[3, : ids.shape[1]], ids[0])
    assert batch.text_mask.sum(dim=1).tolist() == [0, 0, 0, ids.shape[1]]
    assert batch.label.tolist() == [3, 7, -1, -1]  # positions in mmfm-test's classes "0".."9"
    assert batch.captions == [["zero", "a longer zero caption", "nil"], [], ["two"], []]
    # the batch feeds the model as it is
    loss = model.caption_loss({"image": batch.image[[0, 2]]}, batch.caption_ids[[0, 2]], batch.caption_mask[[0, 2]])
    assert torch.isfinite(loss)


def test_absent_modalities_are_none_and_unknown_labels_are_named(model, dataset):
    collate = Collator.from_model(model)
    batch = collate([dataset[3]])
    assert batch.image is None and batch.audio is None and batch.caption_ids is None
    assert batch.text_ids is not None and batch.label.tolist() == [-1]
    with pytest.raises(InputError, match="item 0: label '3' is not one of the classes"):
        Collator(model.processors, model.tokenizer, 32, classes=["cat", "dog"])([dataset[0]])
    no_classes = Collator(model.processors, model.tokenizer, 32)
    assert no_classes([dataset[0], dataset[1]]).label.tolist() == [-1, -1]
    with pytest.raises(InputError, match="item 0 carries image, but the collator has no image processor"):
        Collator({"audio": model.processors["audio"]}, model.tokenizer, 32)([dataset[0]])


def test_collator_and_batch_pickle_and_move(model, dataset):
    collate = pickle.loads(pickle.dumps(Collator.from_model(model)))
    batch = collate([dataset[0], dataset[2]])
    assert_batches_equal(pickle.loads(pickle.dumps(batch)), batch)
    assert_batches_equal(batch.to("cpu"), batch)


def test_cache_media_gives_the_same_batches_and_two_workers_match_none(model, dataset):
    collate = Collator.from_model(model)
    cached = cache_media(dataset, model.processors)
    assert torch.is_tensor(cached[(0, 2)]["image"]) and cached[(0, 2)]["caption"] == "nil"
    assert "image" not in cached[1]
    keys = [(0, 2), (1, 5), (2, 0), (3, 1), (9, 1)]
    assert_batches_equal(collate([cached[k] for k in keys]), collate([dataset[k] for k in keys]))

    def batches(data, workers: int) -> list[Batch]:
        sampler = EpochSampler(len(data), seed=0)
        sampler.set_epoch(1)
        loader = DataLoader(data, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=workers)
        return list(loader)

    reference = batches(dataset, 0)
    assert [len(b) for b in reference] == [3, 3, 3, 1]
    for data in (dataset, cached):
        for workers in (0, 2):
            if data is dataset and workers == 0:
                continue
            got = batches(data, workers)
            assert len(got) == len(reference)
            for a, b in zip(got, reference):
                assert_batches_equal(a, b)


def test_a_tensor_of_the_wrong_shape_is_not_taken_for_processed_media(model, dataset):
    item = dict(dataset[0], image=torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match=r"image 0: a tensor .* processed image of shape \(3, 32, 32\)"):
        Collator.from_model(model)([item])


def test_unreadable_media_name_the_item(model, dataset, tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match="image 5 .*broken.png"):
        Collator.from_model(model)([dict(dataset[5], image=str(broken))])


def test_audio_captions_get_ids_masks_and_references_where_items_have_them(model, dataset):
    items = [
        dict(dataset[0], audio_caption="a short hum", audio_captions=["a short hum", "a buzz"]),
        dataset[1],
        dict(dataset[4], audio_caption="a very much longer whistle"),
    ]
    batch = Collator.from_model(model)(items)
    assert batch.has_audio_caption.tolist() == [True, False, True]
    ids, mask = model.tokenizer(["a short hum", "a very much longer whistle"], model.config.text.max_length)
    assert torch.equal(batch.audio_caption_ids[[0, 2]], ids) and torch.equal(batch.audio_caption_mask[[0, 2]], mask)
    assert not batch.audio_caption_mask[1].any() and (batch.audio_caption_ids[1] == model.tokenizer.pad_id).all()
    assert batch.audio_captions == [["a short hum", "a buzz"], [], ["a very much longer whistle"]]
    # the image captions are untouched
    assert batch.has_caption.tolist() == [True, False, True]
    assert batch.captions == [["zero", "a longer zero caption", "nil"], [], ["c4", "d4"]]
    plain = Collator.from_model(model)([dataset[0], dataset[1]])  # a manifest without audio captions
    assert plain.audio_caption_ids is None and plain.audio_caption_mask is None
    assert plain.has_audio_caption.tolist() == [False, False] and plain.audio_captions == [[], []]
