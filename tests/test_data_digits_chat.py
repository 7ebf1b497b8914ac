"""The chat demo's data: right answers, a validation split that holds out media and phrasings, files that read."""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmfm.cli import main
from mmfm.data import ManifestDataset, digits_chat, write_digits_chat
from mmfm.data.digits import NUMBER_WORDS

# Small enough for a second or two per write: 60 images, one clip per voice and digit, a few tones.
SMALL = {
    "limit": 60,
    "conversations": 260,
    "stage1_conversations": 30,
    "val_per_family": 4,
    "clips_per_digit": 1,
    "val_clips_per_digit": 1,
    "tones_per_digit": 2,
    "val_tones_per_digit": 1,
}
KEYS = {"messages", "images", "audio", "family", "id", "answer"}


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small dataset as `mmfm data digits-chat OUT` writes it (with SMALL counts), and what the command printed."""
    out = tmp_path_factory.mktemp("chat") / "out"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(digits_chat, "write_digits_chat", functools.partial(write_digits_chat, **SMALL))
        assert main(["data", "digits-chat", str(out)]) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def labels(written) -> dict[str, int]:
    """The digit of every medium, from the towers manifests (and, for speech, from its file name)."""
    out, _ = written
    found = {}
    for split in ("train", "val"):
        for record in read_manifest(out / f"towers_{split}.jsonl"):
            path = record.get("image") or record["audio"]
            found[path] = int(record["label"])
            if path.startswith("speech/"):
                assert int(Path(path).stem.split("_")[-2]) == found[path]
    return found


def questions(records: list[dict]) -> set[str]:
    """Every user turn's text without its media placeholders."""
    turns = [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]
    return {re.sub(r"\s*<(image|audio)>\s*", " ", turn).strip() for turn in turns}


def test_the_command_writes_the_manifests_and_prints_the_counts(written):
    out, printed = written
    train, val = read_manifest(out / "train.jsonl"), read_manifest(out / "val.jsonl")
    assert len(train) == 260 and len(val) == 4 * len(digits_chat.FAMILIES)
    assert f"train   260 conversations  {out / 'train.jsonl'}" in printed
    assert f"val      52 conversations  {out / 'val.jsonl'}" in printed
    counts = collections.Counter(r["family"] for r in train)
    for family in digits_chat.FAMILIES:
        assert f"  {family:<18} {counts[family]:>4} train    4 val\n" in printed
    assert f"52 examples (12 images, 30 speech clips, 10 tones)  {out / 'towers_val.jsonl'}" in printed


def test_stage_1_conversations_are_caption_style_about_training_media(written):
    out, printed = written
    stage1 = read_manifest(out / "stage1.jsonl")
    assert len(stage1) == 30 and {r["family"] for r in stage1} == set(digits_chat.STAGE1_FAMILIES)
    assert f"stage1   30 caption-style conversations  {out / 'stage1.jsonl'}" in printed
    val_media = {p for r in read_manifest(out / "val.jsonl") for p in r["images"] + r["audio"]}
    assert not val_media & {p for r in stage1 for p in r["images"] + r["audio"]}


def test_help_exits_0_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "digits-chat", "--help"])
    assert exit_info.value.code == 0
    assert "examples:\n  mmfm data digits-chat " in capsys.readouterr().out


def test_every_placeholder_has_its_medium_and_every_file_reads(written):
    out, _ = written
    for record in read_manifest(out / "train.jsonl") + read_manifest(out / "val.jsonl"):
        assert set(record) <= KEYS and {"messages", "images", "audio", "family", "id"} <= set(record)
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        text = "".join(m["content"] for m in record["messages"])
        assert text.count("<image>") == len(record["images"]) and text.count("<audio>") == len(record["audio"])
        for path in record["images"]:
            assert Image.open(out / path).size == (8, 8)
        for path in record["audio"]:
            info = soundfile.info(out / path)
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert 0.2 <= info.duration <= 1.5
    clip, _ = soundfile.read(out / read_manifest(out / "towers_train.jsonl")[-1]["audio"])
    assert np.abs(clip).max() > 0.1
    towers = ManifestDataset(out / "towers_val.jsonl")
    assert len(towers) == 52 and towers[0]["label"] in [str(d) for d in range(10)]


def test_validation_holds_out_images_voices_tones_and_phrasings(written):
    out, _ = written
    splits = {split: read_manifest(out / f"{split}.jsonl") for split in ("train", "val")}
    towers = {split: read_manifest(out / f"towers_{split}.jsonl") for split in ("train", "val")}
    media = {
        split: {r.get("image") or r["audio"] for r in towers[split]}
        | {p for r in splits[split] for p in r["images"] + r["audio"]}
        for split in splits
    }
    assert media["train"].isdisjoint(media["val"])
    voices = {
        split: {Path(p).stem.rsplit("_", 2)[0] for p in media[split] if p.startswith("speech/")} for split in splits
    }
    assert voices == {"train": set(digits_chat.TRAIN_VOICES), "val": set(digits_chat.VAL_VOICES)}
    train_variants = {voice.partition("+")[2] for voice in voices["train"]}
    assert train_variants.isdisjoint(voice.partition("+")[2] for voice in voices["val"])
    assert questions(splits["train"]).isdisjoint(questions(splits["val"]))


def test_validation_has_as_many_conversations_in_every_family(written):
    out, _ = written
    val = read_manifest(out / "val.jsonl")
    assert collections.Counter(r["family"] for r in val) == dict.fromkeys(digits_chat.FAMILIES, 4)
    assert {r["family"] for r in read_manifest(out / "train.jsonl")} == set(digits_chat.FAMILIES)
    assert len({r["id"] for r in val}) == len(val)


def test_every_answer_is_right(written, labels):
    out, _ = written
    for record in read_manifest(out / "train.jsonl") + read_manifest(out / "val.jsonl"):
        family, messages = record["family"], record["messages"]
        assert ("answer" in record) == (family == "text_only" and record["id"].startswith("val"))
        if "answer" in record:  # a general-knowledge question: the reference reply holds the key word
            assert record["answer"].lower() in messages[-1]["content"].lower()
            continue
        digits = [labels[p] for p in record["images"] + record["audio"]]
        for question, answer in zip(messages[::2], messages[1::2]):
            assert answer["content"] == expected_answer(family, question["content"], digits), record


def expected_answer(family: str, question: str, digits: list[int]) -> str | None:
    """The one right answer to `question`, asked about media with these `digits`."""
    if family == "text_only":
        a, b = map(int, re.findall(r"\d", question))
        return f"{a} + {b} = {a + b}."
    d = digits[0]
    word = NUMBER_WORDS[d]
    parity = re.search(r"\b(even|odd)\b", question)
    numbers = re.findall(r"\d", question)
    if parity:  # image_parity and multi_turn's follow-up
        truth = "odd" if d % 2 else "even"
        return f"{'Yes' if parity[1] == truth else 'No'}, {d} is {truth}."
    if numbers and family in ("image_greater", "multi_turn"):
        n = int(numbers[0])
        return f"Yes, {d} is greater than {n}." if d > n else f"No, {d} is not greater than {n}."
    if family in ("image_digit", "multi_turn"):
        return f"It is {'an' if d == 8 else 'a'} {word}."
    simple = {
        "speech_digit": f"The voice says {word}.",
        "tone_digit": f"It is the tone of key {d}.",
        "describe_image": f"A handwritten {word}.",
        "describe_sound": f"A voice saying {word}.",
        "describe_tone": f"The keypad tone for {d}.",
    }
    if family in simple:
        return simple[family]
    if family in ("sum_image_speech", "sum_image_tone"):
        return f"{digits[0]} + {digits[1]} = {sum(digits)}."
    if family == "compare_images":
        a, b = digits
        return f"The first: {a} is larger than {b}." if a > b else f"The second: {b} is larger than {a}."
    return None


def test_the_same_seed_writes_the_same_files_and_another_seed_does_not(tmp_path):
    tiny = {**SMALL, "limit": 40, "conversations": 60, "val_per_family": 1}
    a, b, c = (write_digits_chat(tmp_path / name, seed=seed, **tiny) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    names = ["train.jsonl", "val.jsonl", "towers_train.jsonl", "towers_val.jsonl", "tones/00003.wav"]
    names.append(read_manifest(a / "towers_val.jsonl")[-15]["audio"])  # a spoken clip
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in names:
        assert (a / name).read_bytes() != (c / name).read_bytes(), name


@pytest.mark.parametrize(
    "kwargs, message",
    [({"conversations": 0}, "conversations"), ({"clips_per_digit": 1.5}, "clips_per_digit"), ({"limit": 3}, "limit")],
)
def test_bad_counts_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_digits_chat(tmp_path, **{**SMALL, **kwargs})
