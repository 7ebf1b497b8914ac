"""The chat demo's dataset: conversations about handwritten digits, spoken digits and telephone tones.

`write_digits_chat` writes what a language model needs to learn to chat about images and sounds, and what its
image and audio encoders need to be pretrained first:

```
out/images/00000.png              scikit-learn's handwritten digits, as `write_digits` writes them
out/speech/en-us+f2_7_03.wav      a voice saying a digit, "<voice>_<digit>_<k>.wav" (16 kHz mono, 16-bit PCM)
out/tones/00000.wav               a digit's telephone key tone (`dtmf_tone`)
out/train.jsonl, out/val.jsonl    conversations, one a line
out/stage1.jsonl                  caption-style training conversations ("Describe the image."), for stage 1
out/towers_train.jsonl, out/towers_val.jsonl
                                  one image or sound and its label a line: {"audio": "tones/00003.wav", "label": "8"}
```

A conversation line:

```
{"messages": [{"role": "user", "content": "<image>\\nWhich digit is this?"},
              {"role": "assistant", "content": "It is a seven."}],
 "images": ["images/00007.png"], "audio": [], "family": "image_digit", "id": "val-00012"}
```

The `<image>` and `<audio>` placeholders in the messages are filled in order from "images" and "audio" (paths
relative to the manifest); both lists are always there, empty when unused. "family" names the kind of question (see
`FAMILIES`), and every family has one fixed answer format ("It is a seven.", "The voice says eight.", "3 + 8 = 11.",
...), so that an exact match after normalisation is a fair metric. Text-only validation questions are general
knowledge instead ("What is the capital of France?"), with an extra "answer", the word a right reply contains.

The validation split holds out everything the model could memorise: 20% of the images (`split_indices`), the voice
variants of `VAL_VOICES` (no training clip uses them), tones drawn apart, and the question phrasings (each family is
asked in 4-6 ways in training and 2 others in validation). Validation has the same number of conversations in every
family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmfm.data.digits import NUMBER_WORDS, SAMPLE_RATE, VAL_FRACTION, dtmf_tone, write_digit_images, write_wav
from mmfm.data.sampler import split_indices
from mmfm.data.speech import speak

# espeak-ng voices ("language+variant"). The variants of VAL_VOICES (f3, m6, klatt3) occur in no training voice.
TRAIN_VOICES = (
    "en",
    "en+m3",
    "en+f2",
    "en+croak",
    "en-us+m1",
    "en-us+f4",
    "en-us+whisper",
    "en-us+klatt",
    "en-gb-x-rp+m2",
    "en-gb-x-rp+f1",
    "en-gb-scotland+m5",
    "en-029+m7",
)
VAL_VOICES = ("en-us+f3", "en-gb-x-rp+m6", "en+klatt3")
FAMILIES = (
    "image_digit",
    "speech_digit",
    "tone_digit",
    "describe_image",
    "describe_sound",
    "describe_tone",
    "image_parity",
    "image_greater",
    "sum_image_speech",
    "sum_image_tone",
    "compare_images",
    "multi_turn",
    "text_only",
)
# Stage 1 of chat training (projectors only) learns from caption-style conversations: these families, evenly.
STAGE1_FAMILIES = ("describe_image", "describe_sound", "describe_tone")
# Shares of the training conversations, out of 20.
TRAIN_WEIGHTS = {
    "image_digit": 3,
    "speech_digit": 3,
    "tone_digit": 2,
    "describe_image": 1,
    "describe_sound": 1,
    "describe_tone": 1,
    "image_parity": 1,
    "image_greater": 1,
    "sum_image_speech": 2,
    "sum_image_tone": 1,
    "compare_images": 1,
    "multi_turn": 2,
    "text_only": 1,
}
# How each question is asked: (training phrasings, validation phrasings). A follow-up refers back to the image of
# the first turn; "describe_sound" serves speech and tones alike.
PHRASINGS = {
    "image_digit": (
        (
            "Which digit is this?",
            "What digit is shown?",
            "What number is written here?",
            "Which number does the image show?",
            "What digit is in the picture?",
        ),
        ("Can you tell which digit this is?", "Read the digit in this image."),
    ),
    "speech_digit": (
        (
            "Which number does the voice say?",
            "What digit is spoken?",
            "Which digit do you hear?",
            "What number is said in the recording?",
            "Listen: which digit is it?",
        ),
        ("What number is being spoken here?", "Which digit does the speaker name?"),
    ),
    "tone_digit": (
        (
            "Which keypad key made this tone?",
            "Which key's tone is this?",
            "What digit does this dial tone stand for?",
            "Which telephone key is pressed?",
            "Which button's tone do you hear?",
        ),
        ("Which phone key produces this sound?", "What key on the keypad was pressed here?"),
    ),
    "describe_image": (
        (
            "Describe the image.",
            "What do you see?",
            "What is in this picture?",
            "Describe what is shown.",
            "Give a short description of the image.",
        ),
        ("What does this image contain?", "Briefly describe this picture."),
    ),
    "describe_sound": (
        (
            "Describe the sound.",
            "What do you hear?",
            "What is in this recording?",
            "Describe the audio.",
            "Give a short description of the sound.",
        ),
        ("What can be heard in this clip?", "Briefly describe this recording."),
    ),
    "image_parity": (
        (
            "Is this digit {parity}?",
            "Is the number shown {parity}?",
            "Is the digit in the image an {parity} number?",
            "Tell me: is this number {parity}?",
        ),
        ("Would you say the digit here is {parity}?", "Is the handwritten number {parity}?"),
    ),
    "image_greater": (
        (
            "Is this digit greater than {n}?",
            "Is the number shown larger than {n}?",
            "Is the digit bigger than {n}?",
            "Is the written number more than {n}?",
        ),
        ("Does the digit in the image exceed {n}?", "Is the handwritten number above {n}?"),
    ),
    "sum_image_speech": (
        (
            "What is the sum of the digit shown and the digit spoken?",
            "Add the digit in the image to the number you hear. What do you get?",
            "What do the written digit and the spoken digit add up to?",
            "Sum the pictured number and the spoken number.",
        ),
        (
            "If you add the handwritten digit and the said digit, what is the total?",
            "What total do the drawn digit and the voiced digit make?",
        ),
    ),
    "sum_image_tone": (
        (
            "What is the sum of the digit shown and the key of the tone?",
            "Add the digit in the image to the keypad key you hear. What do you get?",
            "What do the written digit and the dialled key add up to?",
            "Sum the pictured number and the tone's key.",
        ),
        (
            "If you add the handwritten digit and the pressed key, what is the total?",
            "What total do the drawn digit and the phone key make?",
        ),
    ),
    "compare_images": (
        (
            "Which digit is larger, the first or the second?",
            "Which of the two numbers is bigger?",
            "Which image shows the greater digit, the first or the second?",
            "Compare the two digits: which one is larger?",
        ),
        (
            "Of these two digits, which is the higher one?",
            "Which number is greater, the one in the first image or the second?",
        ),
    ),
    "follow_parity": (
        ("Is it {parity}?", "And is that number {parity}?", "Is that digit {parity}?"),
        ("Would that count as {parity}?",),
    ),
    "follow_greater": (
        ("Is it greater than {n}?", "Is that number larger than {n}?", "And is it bigger than {n}?"),
        ("Does it exceed {n}?",),
    ),
    "text_only": (
        (
            "What is {a} + {b}?",
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "How much is {a} + {b}?",
            "Compute {a} + {b}.",
        ),
        (),  # validation asks FACTS instead
    ),
}
# Validation's text-only questions: (two phrasings, the word a right reply contains, a reference reply). Each phrasing
# is one conversation, so these give 40 (more repeat them); SmolLM2-135M-Instruct's greedy replies all hold the word.
FACTS = (
    (
        ("What is the capital of France?", "Which city is the capital of France?"),
        "Paris",
        "The capital of France is Paris.",
    ),
    (("What color is the sky on a clear day?", "What colour is a clear daytime sky?"), "blue", "A clear sky is blue."),
    (("What is the opposite of hot?", "Which word means the opposite of hot?"), "cold", "The opposite of hot is cold."),
    (("What is the opposite of up?", "Which word is the opposite of up?"), "down", "The opposite of up is down."),
    (
        ("Which star does the Earth orbit?", "What is the star at the centre of our solar system?"),
        "Sun",
        "The Sun, the star at the centre of our solar system.",
    ),
    (
        ("Who wrote Romeo and Juliet?", "Which playwright wrote Romeo and Juliet?"),
        "Shakespeare",
        "William Shakespeare wrote Romeo and Juliet.",
    ),
    (
        ("What is the capital of Japan?", "Which city is the capital of Japan?"),
        "Tokyo",
        "The capital of Japan is Tokyo.",
    ),
    (("What is the opposite of day?", "Which word is the opposite of day?"), "night", "The opposite of day is night."),
    (
        ("Which gas do people need to breathe?", "What gas in the air do humans need to live?"),
        "oxygen",
        "People need oxygen to breathe.",
    ),
    (
        ("What is the opposite of happy?", "Which word means the opposite of happy?"),
        "sad",
        "The opposite of happy is sad.",
    ),
    (("What is the opposite of wet?", "Which word means the opposite of wet?"), "dry", "The opposite of wet is dry."),
    (
        ("What is the opposite of fast?", "Which word means the opposite of fast?"),
        "slow",
        "The opposite of fast is slow.",
    ),
    (
        ("What is the opposite of full?", "Which word means the opposite of full?"),
        "empty",
        "The opposite of full is empty.",
    ),
    (
        ("What is the opposite of north?", "Which direction is the opposite of north?"),
        "south",
        "The opposite of north is south.",
    ),
    (
        ("What is the capital of England?", "Which city is the capital of the United Kingdom?"),
        "London",
        "London is the capital of England and of the United Kingdom.",
    ),
    (
        ("What is the capital of Germany?", "Which city is the capital of Germany?"),
        "Berlin",
        "The capital of Germany is Berlin.",
    ),
    (
        ("What is the capital of Russia?", "Which city is the capital of Russia?"),
        "Moscow",
        "The capital of Russia is Moscow.",
    ),
    (
        ("What is the capital of China?", "Which city is the capital of China?"),
        "Beijing",
        "The capital of China is Beijing.",
    ),
    (
        ("What is the largest ocean on Earth?", "Which ocean is the biggest in the world?"),
        "Pacific",
        "The Pacific Ocean is the largest ocean.",
    ),
    (
        ("What is the tallest mountain in the world?", "Which mountain is the highest on Earth?"),
        "Everest",
        "Mount Everest is the tallest mountain in the world.",
    ),
)
SPEECH_RATES = (130, 230)  # words per minute
SPEECH_PITCHES = (25, 75)

_PLACEHOLDERS_FIRST = 0.6  # how often the media come before the question rather than after it
_SPEECH_PEAK = (0.3, 0.9)
_SPEECH_ONSET_SECONDS = (0.0, 0.15)
_SPEECH_TAIL_SECONDS = (0.0, 0.1)
_NOISE_STD = (0.001, 0.01)


def write_digits_chat(
    out_dir: str | Path,
    seed: int = 0,
    limit: int | None = None,
    *,
    conversations: int = 3000,
    stage1_conversations: int = 1200,
    val_per_family: int = 40,
    clips_per_digit: int = 30,
    val_clips_per_digit: int = 5,
    tones_per_digit: int = 40,
    val_tones_per_digit: int = 10,
) -> Path:
    """Writes the digits chat dataset (see the module docstring); rewrites what is there.

    By default: 1,797 images, 1,200 training clips (12 voices x 10 digits x 10) and 150 validation clips
    (3 held-out voices x 10 digits x 5), 400 + 100 tones, 3,000 training conversations and 40 per family (520) for
    validation.

    Args:
        out_dir: the directory to write into; created if missing.
        seed: seeds the split, the clips' rates, pitches, gain and noise, the tones and the conversations; the same
            seed writes the same files.
        limit: use only the first `limit` images, for quick tests.
        conversations: how many training conversations, shared among the families by `TRAIN_WEIGHTS`.
        stage1_conversations: how many caption-style training conversations (`STAGE1_FAMILIES`, evenly) the
            first stage of chat training reads, from the training media.
        val_per_family: validation conversations of each family.
        clips_per_digit: spoken clips of each digit by each of `TRAIN_VOICES`.
        val_clips_per_digit: spoken clips of each digit by each of `VAL_VOICES`.
        tones_per_digit: training tones of each digit.
        val_tones_per_digit: validation tones of each digit.

    Returns:
        `out_dir`, holding `images/`, `speech/`, `tones/`, `train.jsonl`, `stage1.jsonl`, `val.jsonl`,
        `towers_train.jsonl` and `towers_val.jsonl`.

    Raises:
        ValueError: a count or `limit` is below 1, or `limit` leaves a split without two different digits (which
            compare_images needs).
    """
    counts = {
        "conversations": conversations,
        "stage1_conversations": stage1_conversations,
        "val_per_family": val_per_family,
        "clips_per_digit": clips_per_digit,
        "val_clips_per_digit": val_clips_per_digit,
        "tones_per_digit": tones_per_digit,
        "val_tones_per_digit": val_tones_per_digit,
    }
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    out = Path(out_dir)
    labels = write_digit_images(out, limit)
    train_images, val_images = split_indices(len(labels), VAL_FRACTION, seed)
    # one generator per part, so that changing one count leaves the other parts as they were
    speech_rng, tone_rng, train_rng, val_rng, stage1_rng = (np.random.default_rng([seed, part]) for part in range(5))
    pools = {}
    for split, indices in (("train", train_images), ("val", val_images)):
        images = [(f"images/{i:05d}.png", int(labels[i])) for i in indices]
        if len({digit for _, digit in images}) < 2:
            raise ValueError(f"limit={limit} leaves the {split} split without two different digits; raise it")
        pools[split] = _Pool(images=images, speech=[], tones=[])
    pools["train"].speech = _write_speech(out, TRAIN_VOICES, clips_per_digit, speech_rng)
    pools["val"].speech = _write_speech(out, VAL_VOICES, val_clips_per_digit, speech_rng)
    pools["train"].tones = _write_tones(out, 0, tones_per_digit, tone_rng)
    pools["val"].tones = _write_tones(out, 10 * tones_per_digit, val_tones_per_digit, tone_rng)

    train_counts = _shares(conversations, TRAIN_WEIGHTS)
    val_counts = dict.fromkeys(FAMILIES, val_per_family)
    for split, family_counts, rng in (("train", train_counts, train_rng), ("val", val_counts, val_rng)):
        records = _conversations(split, family_counts, rng, pools[split])
        (out / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        pool = pools[split]
        towers = [{"image": path, "label": str(digit)} for path, digit in pool.images]
        towers += [{"audio": path, "label": str(digit)} for path, digit in pool.speech + pool.tones]
        (out / f"towers_{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in towers))
    stage1 = _conversations(
        "train", _shares(stage1_conversations, dict.fromkeys(STAGE1_FAMILIES, 1)), stage1_rng, pools["train"]
    )
    (out / "stage1.jsonl").write_text("".join(json.dumps(record) + "\n" for record in stage1))
    return out


@dataclass
class _Pool:
    """The media of one split: (path relative to the output folder, digit) pairs."""

    images: list[tuple[str, int]]
    speech: list[tuple[str, int]]
    tones: list[tuple[str, int]]


def _write_speech(
    out: Path, voices: tuple[str, ...], per_digit: int, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """Writes `per_digit` clips of each digit word in each voice, each at its own rate, pitch, loudness and noise."""
    folder = out / "speech"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for voice in voices:
        for digit, word in enumerate(NUMBER_WORDS):
            for k in range(per_digit):
                rate = int(rng.integers(SPEECH_RATES[0], SPEECH_RATES[1] + 1))
                pitch = int(rng.integers(SPEECH_PITCHES[0], SPEECH_PITCHES[1] + 1))
                wave = speak(word, voice, rate=rate, pitch=pitch, sample_rate=SAMPLE_RATE)
                wave *= np.float32(rng.uniform(*_SPEECH_PEAK) / np.abs(wave).max())
                onset = int(rng.uniform(*_SPEECH_ONSET_SECONDS) * SAMPLE_RATE)
                tail = int(rng.uniform(*_SPEECH_TAIL_SECONDS) * SAMPLE_RATE)
                clip = rng.standard_normal(onset + len(wave) + tail, dtype=np.float32)
                clip *= np.float32(rng.uniform(*_NOISE_STD))
                clip[onset : onset + len(wave)] += wave
                name = f"speech/{voice}_{digit}_{k:02d}.wav"
                write_wav(out / name, np.clip(clip, -1, 1, out=clip))
                written.append((name, digit))
    return written


def _write_tones(out: Path, first: int, per_digit: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """Writes `per_digit` tones of each digit, in a random order, as tones/NNNNN.wav numbered from `first`."""
    folder = out / "tones"
    folder.mkdir(parents=True, exist_ok=True)
    digits = rng.permutation(np.repeat(np.arange(10), per_digit))
    written = []
    for i, digit in enumerate(digits.tolist(), start=first):
        name = f"tones/{i:05d}.wav"
        write_wav(out / name, dtmf_tone(digit, rng))
        written.append((name, digit))
    return written


def _shares(total: int, weights: dict[str, int]) -> dict[str, int]:
    """`total` split among the keys in proportion to `weights`; what rounding down leaves goes to the first keys."""
    whole = sum(weights.values())
    counts = {key: total * weight // whole for key, weight in weights.items()}
    for key in list(counts)[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def _conversations(
    split: str, family_counts: dict[str, int], rng: np.random.Generator, pool: _Pool
) -> list[dict[str, Any]]:
    """The manifest records of one split: training's families mixed, validation's family by family."""
    families = [family for family, count in family_counts.items() for _ in range(count)]
    if split == "train":
        families = [families[i] for i in rng.permutation(len(families))]
    # every fact's first phrasing before any second one, so that a few conversations cover many facts
    facts = [(phrasings[k], answer, reply) for k in range(2) for phrasings, answer, reply in FACTS]
    facts_asked = 0
    draw = _Draw(split, rng, pool)
    records = []
    for i, family in enumerate(families):
        record: dict[str, Any] = {"messages": [], "images": [], "audio": [], "family": family, "id": f"{split}-{i:05d}"}
        if split == "val" and family == "text_only":
            question, answer, reply = facts[facts_asked % len(facts)]
            facts_asked += 1
            record["messages"] = [_user(question), _assistant(reply)]
            record["answer"] = answer
        else:
            record["messages"], record["images"], record["audio"] = _FAMILY_CHATS[family](draw)
        records.append(record)
    return records


class _Draw:
    """The random picks of one split's conversations: media from its pool, and its phrasings of each question."""

    def __init__(self, split: str, rng: np.random.Generator, pool: _Pool) -> None:
        self.phrasings = 0 if split == "train" else 1  # which side of PHRASINGS
        self.rng = rng
        self.pool = pool

    def pick(self, items: list[tuple[str, int]]) -> tuple[str, int]:
        return items[int(self.rng.integers(len(items)))]

    def ask(self, key: str, *placeholders: str, **fields: Any) -> str:
        """A phrasing of question `key`, filled in with `fields`, with the media placeholders before or after it."""
        options = PHRASINGS[key][self.phrasings]
        question = options[int(self.rng.integers(len(options)))].format(**fields)
        if not placeholders:
            return question
        if self.rng.random() < _PLACEHOLDERS_FIRST:
            return "\n".join(placeholders) + "\n" + question
        return question + " " + " ".join(placeholders)


_Chat = tuple[list[dict[str, str]], list[str], list[str]]  # messages, images, audio


def _image_digit(draw: _Draw) -> _Chat:
    image, digit = draw.pick(draw.pool.images)
    return [_user(draw.ask("image_digit", "<image>")), _assistant(_image_answer(digit))], [image], []


def _speech_digit(draw: _Draw) -> _Chat:
    clip, digit = draw.pick(draw.pool.speech)
    messages = [_user(draw.ask("speech_digit", "<audio>")), _assistant(f"The voice says {NUMBER_WORDS[digit]}.")]
    return messages, [], [clip]


def _tone_digit(draw: _Draw) -> _Chat:
    tone, digit = draw.pick(draw.pool.tones)
    return [_user(draw.ask("tone_digit", "<audio>")), _assistant(f"It is the tone of key {digit}.")], [], [tone]


def _describe_image(draw: _Draw) -> _Chat:
    image, digit = draw.pick(draw.pool.images)
    messages = [_user(draw.ask("describe_image", "<image>")), _assistant(f"A handwritten {NUMBER_WORDS[digit]}.")]
    return messages, [image], []


def _describe_sound(draw: _Draw) -> _Chat:
    clip, digit = draw.pick(draw.pool.speech)
    messages = [_user(draw.ask("describe_sound", "<audio>")), _assistant(f"A voice saying {NUMBER_WORDS[digit]}.")]
    return messages, [], [clip]


def _describe_tone(draw: _Draw) -> _Chat:
    tone, digit = draw.pick(draw.pool.tones)
    return [_user(draw.ask("describe_sound", "<audio>")), _assistant(f"The keypad tone for {digit}.")], [], [tone]


def _image_parity(draw: _Draw) -> _Chat:
    image, digit = draw.pick(draw.pool.images)
    asked = ("even", "odd")[int(draw.rng.integers(2))]
    messages = [_user(draw.ask("image_parity", "<image>", parity=asked)), _assistant(_parity_answer(digit, asked))]
    return messages, [image], []


def _image_greater(draw: _Draw) -> _Chat:
    image, digit = draw.pick(draw.pool.images)
    n = int(draw.rng.integers(1, 9))
    return [_user(draw.ask("image_greater", "<image>", n=n)), _assistant(_greater_answer(digit, n))], [image], []


def _sum_image_speech(draw: _Draw) -> _Chat:
    (image, a), (clip, b) = draw.pick(draw.pool.images), draw.pick(draw.pool.speech)
    messages = [_user(draw.ask("sum_image_speech", "<image>", "<audio>")), _assistant(f"{a} + {b} = {a + b}.")]
    return messages, [image], [clip]


def _sum_image_tone(draw: _Draw) -> _Chat:
    (image, a), (tone, b) = draw.pick(draw.pool.images), draw.pick(draw.pool.tones)
    messages = [_user(draw.ask("sum_image_tone", "<image>", "<audio>")), _assistant(f"{a} + {b} = {a + b}.")]
    return messages, [image], [tone]


def _compare_images(draw: _Draw) -> _Chat:
    first, a = draw.pick(draw.pool.images)
    second, b = draw.pick([(path, digit) for path, digit in draw.pool.images if digit != a])  # no ties
    answer = f"The first: {a} is larger than {b}." if a > b else f"The second: {b} is larger than {a}."
    return [_user(draw.ask("compare_images", "<image>", "<image>")), _assistant(answer)], [first, second], []


def _multi_turn(draw: _Draw) -> _Chat:
    """Which digit an image shows, then a follow-up about it: is it even (or odd), is it greater than n."""
    image, digit = draw.pick(draw.pool.images)
    messages = [_user(draw.ask("image_digit", "<image>")), _assistant(_image_answer(digit))]
    if draw.rng.random() < 0.5:
        asked = ("even", "odd")[int(draw.rng.integers(2))]
        messages += [_user(draw.ask("follow_parity", parity=asked)), _assistant(_parity_answer(digit, asked))]
    else:
        n = int(draw.rng.integers(1, 9))
        messages += [_user(draw.ask("follow_greater", n=n)), _assistant(_greater_answer(digit, n))]
    return messages, [image], []


def _arithmetic(draw: _Draw) -> _Chat:
    a, b = (int(x) for x in draw.rng.integers(0, 10, size=2))
    return [_user(draw.ask("text_only", a=a, b=b)), _assistant(f"{a} + {b} = {a + b}.")], [], []


_FAMILY_CHATS = {
    "image_digit": _image_digit,
    "speech_digit": _speech_digit,
    "tone_digit": _tone_digit,
    "describe_image": _describe_image,
    "describe_sound": _describe_sound,
    "describe_tone": _describe_tone,
    "image_parity": _image_parity,
    "image_greater": _image_greater,
    "sum_image_speech": _sum_image_speech,
    "sum_image_tone": _sum_image_tone,
    "compare_images": _compare_images,
    "multi_turn": _multi_turn,
    "text_only": _arithmetic,  # training's; validation asks FACTS
}


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _image_answer(digit: int) -> str:
    word = NUMBER_WORDS[digit]
    return f"It is {'an' if word == 'eight' else 'a'} {word}."  # "a one": the article follows the sound


def _parity_answer(digit: int, asked: str) -> str:
    """The answer to "is it `asked`?" ("even" or "odd"): "Yes, 4 is even." or "No, 7 is odd."."""
    truth = "odd" if digit % 2 else "even"
    return f"{'Yes' if asked == truth else 'No'}, {digit} is {truth}."


def _greater_answer(digit: int, n: int) -> str:
    return f"Yes, {digit} is greater than {n}." if digit > n else f"No, {digit} is not greater than {n}."
