"""A caption task over sounds alone trains and is scored on the examples' audio captions, else on their captions."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

import mmfm
from mmfm.data import Collator, ManifestDataset
from mmfm.eval.run import evaluate_data
from mmfm.train.config import TaskConfig
from mmfm.train.evaluate import evaluate
from mmfm.train.objectives import build_objective


@pytest.fixture(scope="module")
def model() -> mmfm.MultimodalModel:
    torch.manual_seed(0)
    return mmfm.create_model("mmfm-test").eval()


def without(item: dict, *keys: str) -> dict:
    return {k: v for k, v in item.items() if k not in keys}


def decoded(model, ids: torch.Tensor) -> list[str]:
    return [model.tokenizer.decode(row) for row in ids]


def test_an_audio_task_trains_on_audio_captions_and_falls_back_to_captions(model, tiny_digits):
    items = [ManifestDataset(tiny_digits / "train.jsonl")[(i, i)] for i in range(5)]
    # short image captions, so that the fallback rows' ids are padded to the audio captions' length
    items = [dict(item, caption=f"c{i}", captions=[f"c{i}"]) for i, item in enumerate(items)]
    items[2:4] = [without(item, "audio_caption", "audio_captions") for item in items[2:4]]  # an older manifest
    items[4] = without(items[4], "caption", "captions", "audio_caption", "audio_captions")  # nothing to learn
    batch = Collator.from_model(model)(items)
    audio = build_objective(TaskConfig("audio_caption", "caption", ["audio"]), model)
    rows = audio.rows(batch)
    assert rows.tolist() == [True, True, True, True, False]
    ids, mask = audio.target(batch, rows)
    expected = [items[0]["audio_caption"], items[1]["audio_caption"], "c2", "c3"]
    assert "tone" in expected[0] and decoded(model, ids) == expected
    assert mask.sum(dim=1).tolist() == [len(text.encode()) + 2 for text in expected]  # byte ids, BOS and EOS
    assert audio.references(batch, rows) == [items[0]["audio_captions"], items[1]["audio_captions"], ["c2"], ["c3"]]
    assert int(audio.units(batch)) == int(mask[:, 1:].sum())
    # the padding of the mixed rows changes nothing: the loss is that of the two kinds of rows apart
    own, fallback = Collator.from_model(model)(items[:2]), Collator.from_model(model)(items[2:4])
    with torch.no_grad():
        mixed, apart = audio.loss_sum(model, batch), audio.loss_sum(model, own) + audio.loss_sum(model, fallback)
    torch.testing.assert_close(mixed, apart)

    # tasks that see the image caption its drawing
    for inputs in (["image"], ["image", "audio"]):
        objective = build_objective(TaskConfig("it", "caption", inputs), model)
        rows = objective.rows(batch)
        assert rows.tolist() == [True, True, True, True, False]
        assert decoded(model, objective.target(batch, rows)[0]) == ["c0", "c1", "c2", "c3"]


def test_exact_match_of_an_audio_task_compares_with_the_audio_captions(model, tiny_digits, monkeypatch):
    val = ManifestDataset(tiny_digits / "val.jsonl")
    items = [val[i] for i in range(6)]
    answers = [item["audio_captions"][-1] for item in items]  # any reference counts
    monkeypatch.setattr("mmfm.train.evaluate.caption_tensors", lambda model, media, **_: answers)
    tasks = [TaskConfig("audio_caption", "caption", ["audio"]), TaskConfig("image_caption", "caption", ["image"])]
    objectives = {t.name: build_objective(t, model) for t in tasks}
    loader = DataLoader(items, batch_size=len(items), collate_fn=Collator.from_model(model))
    metrics = evaluate(model, objectives, loader)
    assert metrics["val/audio_caption/exact_match"] == 1.0
    assert metrics["val/image_caption/exact_match"] == 0.0


def test_eval_without_a_recipe_finds_the_audio_task_of_sounds_with_audio_captions(model, tiny_digits, tmp_path):
    lines = [json.loads(line) for line in (tiny_digits / "val.jsonl").read_text().splitlines()[:3]]
    sounds = [{"audio": str(tiny_digits / x["audio"]), "audio_caption": x["audio_caption"]} for x in lines]
    manifest = tmp_path / "sounds.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in sounds))
    metrics = evaluate_data(model, manifest, model_name=str(tmp_path / "no-model")).metrics
    assert {k for k in metrics if k.endswith("/exact_match")} == {"val/audio_caption/exact_match"}
