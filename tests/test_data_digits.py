"""The digits demo dataset: right DTMF frequencies, a fixed disjoint split, files the model's processors read."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import mmfm
from mmfm.cli import main
from mmfm.data import Collator, ManifestDataset, dtmf_tone, write_digits
from mmfm.data.digits import DTMF_FREQUENCIES, NUMBER_WORDS, digit_tone_captions

Q23 = {1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336)}
Q23 |= {6: (770, 1477), 7: (852, 1209), 8: (852, 1336), 9: (852, 1477), 0: (941, 1336)}


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The dataset as `mmfm data digits OUT` writes it, and what the command printed."""
    out = tmp_path_factory.mktemp("digits") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["data", "digits", str(out)]) == 0
    return out, stdout.getvalue()


@pytest.mark.parametrize("digit", range(10))
def test_dtmf_tone_has_its_two_q23_frequencies_as_spectral_peaks(digit):
    assert DTMF_FREQUENCIES[str(digit)] == Q23[digit]
    for seed in range(3):
        clip = dtmf_tone(digit, np.random.default_rng(seed))
        assert clip.dtype == np.float32 and clip.ndim == 1
        assert 0.2 * 16000 <= len(clip) <= 1.2 * 16000 and np.abs(clip).max() <= 1
        spectrum = np.abs(np.fft.rfft(clip))
        freqs = np.fft.rfftfreq(len(clip), 1 / 16000)
        first = freqs[spectrum.argmax()]
        spectrum[np.abs(freqs - first) < 60] = 0  # the other peak lies at least 267 Hz away
        second = freqs[spectrum.argmax()]
        low, high = sorted((first, second))
        assert abs(low - Q23[digit][0]) < 6 and abs(high - Q23[digit][1]) < 6, (digit, low, high)


def test_tones_vary_with_the_generator_and_repeat_with_its_seed():
    a, b = dtmf_tone("7", np.random.default_rng(0)), dtmf_tone("7", np.random.default_rng(1))
    assert len(a) != len(b)
    assert np.array_equal(a, dtmf_tone(7, np.random.default_rng(0)))
    with pytest.raises(ValueError):
        dtmf_tone(10, np.random.default_rng(0))


def test_cli_writes_1797_examples_with_a_fixed_disjoint_20_percent_validation_split(written):
    out, printed = written
    train, val = read_manifest(out / "train.jsonl"), read_manifest(out / "val.jsonl")
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) <= 1
    assert {x["image"] for x in train}.isdisjoint(x["image"] for x in val)
    assert len({x["image"] for x in train + val}) == 1797
    assert {x["label"] for x in val} == {str(d) for d in range(10)}
    assert f"train  {len(train)} examples  {out / 'train.jsonl'}" in printed
    assert f"val     {len(val)} examples  {out / 'val.jsonl'}" in printed
    example = train[0]
    assert set(example) == {"image", "audio", "caption", "audio_caption", "label"}
    assert len(example["caption"]) >= 4 and all(len(c.encode()) < 32 for c in example["caption"])
    word = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][int(example["label"])]
    assert any(word in c for c in example["caption"]) and any(example["label"] in c for c in example["caption"])
    image = Image.open(out / example["image"])
    assert image.mode == "L" and image.size == (8, 8) and np.asarray(image).max() > 200
    info = soundfile.info(out / example["audio"])
    assert info.samplerate == 16000 and info.subtype == "PCM_16" and info.duration <= 1.2


def test_every_tone_is_captioned_as_a_sound_of_its_digit_never_as_a_picture(written):
    out, _ = written
    lines = read_manifest(out / "train.jsonl") + read_manifest(out / "val.jsonl")
    for line in lines:
        digit = line["label"]
        assert line["audio_caption"] == digit_tone_captions(digit) and len(line["audio_caption"]) >= 3
        assert set(line["audio_caption"]).isdisjoint(line["caption"])
        for caption in line["audio_caption"]:
            assert digit in caption or NUMBER_WORDS[int(digit)] in caption, caption
            assert not any(word in caption for word in ("drawing", "handwritten", "picture", "written")), caption
            assert len(caption.encode()) + 2 <= 32  # BOS and EOS included, the byte tokenizer's max_length
    assert {line["audio_caption"][0] for line in lines} == {f"the keypad tone for {d}" for d in range(10)}


@pytest.mark.parametrize("command", [["data"], ["data", "digits"]])
def test_data_help_exits_0_with_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:\n  mmfm data digits " in capsys.readouterr().out


def test_data_without_a_dataset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data"])
    assert exit_info.value.code == 2
    assert "DATASET" in capsys.readouterr().err


def test_the_same_seed_writes_the_same_split_and_files_and_another_seed_does_not(written, tmp_path):
    out, _ = written
    a, b, c = (write_digits(tmp_path / name, seed=seed, limit=60) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    write_digits(a, seed=0, limit=60)  # rewriting in place changes nothing
    for name in ("train.jsonl", "val.jsonl", "audio/00017.wav", "images/00059.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert len(read_manifest(a / "val.jsonl")) == 12 and len(read_manifest(a / "train.jsonl")) == 48
    assert (a / "val.jsonl").read_text() != (c / "val.jsonl").read_text()
    assert (a / "audio/00017.wav").read_bytes() != (c / "audio/00017.wav").read_bytes()
    # the first tones of a limited write are those of the full one: the same seeded stream
    assert (a / "audio/00017.wav").read_bytes() == (out / "audio/00017.wav").read_bytes()
    assert (a / "images/00059.png").read_bytes() == (out / "images/00059.png").read_bytes()


def test_files_load_with_the_model_processors(written):
    out, _ = written
    model = mmfm.create_model("mmfm-test")
    val = ManifestDataset(out / "val.jsonl")
    batch = Collator.from_model(model)([val[(i, i)] for i in range(8)])
    assert batch.image.shape == (8, 3, 32, 32) and batch.audio.shape == (8, 64, 32)
    assert torch.isfinite(batch.image).all() and torch.isfinite(batch.audio).all()
    assert batch.has_image.all() and batch.has_audio.all() and batch.has_caption.all()
    assert batch.label.tolist() == [int(val[i]["label"]) for i in range(8)]
    assert batch.image.std() > 0.1 and batch.audio.std() > 0.1
