"""The built-in demo dataset: real handwritten digits, each with captions, a label and the digit's telephone tone.

The images are scikit-learn's `load_digits()` (1,797 8x8 scans, UCI optical digits), so no download is needed.
Each image is paired with:

- captions from a few templates ("a handwritten seven", "the digit 7", ...), all of them as references;
- its label, the digit as a str ("0".."9");
- a synthetic DTMF tone (the sound a telephone key makes, ITU-T Q.23) for the same digit, with random duration,
  loudness, onset and background noise, so that audio models have something real to tell apart;
- audio captions that describe the tone as a sound ("the keypad tone for 7", ...), all of them as references:
  an audio caption task trains on these, since a tone is not "a handwritten seven".

`write_digits` lays it out as files and two JSONL manifests (see `mmfm.data.manifest`) with a fixed held-out split:

```
out/images/00000.png   8-bit greyscale, 8x8
out/audio/00000.wav    16 kHz mono, 16-bit PCM, at most 1.2 s
out/train.jsonl        {"image": "images/00000.png", "audio": "audio/00000.wav", "caption": [...],
                       "audio_caption": [...], "label": "0"}, one line per example
out/val.jsonl          the same for the held-out 20% of images
```
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from mmfm.data.sampler import split_indices

# ITU-T Q.23: each key sounds one low (row) and one high (column) frequency, in Hz.
DTMF_FREQUENCIES = {
    "1": (697, 1209),
    "2": (697, 1336),
    "3": (697, 1477),
    "4": (770, 1209),
    "5": (770, 1336),
    "6": (770, 1477),
    "7": (852, 1209),
    "8": (852, 1336),
    "9": (852, 1477),
    "0": (941, 1336),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every caption, of the image or of the tone, has at most 30 bytes: with BOS and EOS it fits the 32 ids of the
# byte tokenizer of the small presets.
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a picture of the number {word}",
    "a drawing of {a_word}",
    "the number {digit}, written by hand",
)
# The tone is a sound: its captions say what is heard, never what a picture shows.
TONE_CAPTION_TEMPLATES = (
    "the keypad tone for {digit}",
    "a telephone key tone, {word}",
    "the sound of key {digit} on a phone",
    "the touch tone of digit {word}",
)
SAMPLE_RATE = 16000
VAL_FRACTION = 0.2
MAX_SECONDS = 1.2

_TONE_SECONDS = (0.2, 0.7)
_ONSET_SECONDS = (0.0, 0.3)
_TAIL_SECONDS = (0.0, 0.2)
_RAMP_SECONDS = 0.005


def digit_captions(digit: int | str) -> list[str]:
    """Every template's caption of a digit, e.g. ["a handwritten seven", "the digit 7", ...]."""
    digit = _check_digit(digit)
    word = NUMBER_WORDS[int(digit)]
    a_word = f"{'an' if word == 'eight' else 'a'} {word}"  # "a one": the article follows the sound
    return [template.format(word=word, a_word=a_word, digit=digit) for template in CAPTION_TEMPLATES]


def digit_tone_captions(digit: int | str) -> list[str]:
    """Every template's caption of a digit's telephone tone, e.g. ["the keypad tone for 7", ...]."""
    digit = _check_digit(digit)
    return [template.format(word=NUMBER_WORDS[int(digit)], digit=digit) for template in TONE_CAPTION_TEMPLATES]


def dtmf_tone(digit: int | str, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A noisy telephone key tone of `digit`: its two Q.23 sines, after some silence, within 1.2 s.

    Drawn from `rng`: the tone's duration (0.2-0.7 s), the leading silence (0-0.3 s), the trailing silence
    (0-0.2 s), the loudness (peak 0.2-0.8), the high tone's level relative to the low one (+-3 dB, as real keypads
    vary) and white noise (standard deviation 0.002-0.02) over the whole clip. The tone fades in and out over
    5 ms so that it does not click.

    Args:
        digit: 0..9, as an int or a str.
        rng: the random source; the same generator state gives the same clip.
        sample_rate: samples per second.

    Returns:
        float32 mono samples in [-1, 1], shape (T,).
    """
    low, high = DTMF_FREQUENCIES[_check_digit(digit)]
    tone_len = int(rng.uniform(*_TONE_SECONDS) * sample_rate)
    onset = int(rng.uniform(*_ONSET_SECONDS) * sample_rate)
    tail = int(rng.uniform(*_TAIL_SECONDS) * sample_rate)
    peak = rng.uniform(0.2, 0.8)
    twist = 10 ** (rng.uniform(-3, 3) / 20)
    noise_std = rng.uniform(0.002, 0.02)

    # float32 throughout: half the work of float64, and the phase error stays below 1e-3 rad over 0.7 s
    omega = np.arange(tone_len, dtype=np.float32) * np.float32(2 * np.pi / sample_rate)  # (tone_len,)
    tone = np.sin(low * omega) + np.float32(twist) * np.sin(high * omega)
    ramp = int(_RAMP_SECONDS * sample_rate)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp, dtype=np.float32) / ramp)  # raised cosine, 0 -> 1
    tone[:ramp] *= fade
    tone[-ramp:] *= fade[::-1]
    tone *= np.float32(peak / (1 + twist))

    clip = rng.standard_normal(onset + tone_len + tail, dtype=np.float32) * np.float32(noise_std)
    clip[onset : onset + tone_len] += tone
    return np.clip(clip, -1, 1, out=clip)


def write_digits(out_dir: str | Path, seed: int = 0, limit: int | None = None) -> Path:
    """Writes the digits dataset (1,797 examples) as PNGs, WAVs and train/val manifests; rewrites what is there.

    Args:
        out_dir: the directory to write into; created if missing.
        seed: seeds the tones and the split (`split_indices`, 20% held out); the same seed writes the same files.
        limit: write only the first `limit` images, for quick tests; the split is then drawn among them.

    Returns:
        `out_dir`, holding `images/`, `audio/`, `train.jsonl` and `val.jsonl`.

    Raises:
        ValueError: `limit` is below 2 (the split needs an example on each side).
    """
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be at least 2 (one train and one val example), got {limit}")
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    labels = write_digit_images(out, limit)
    rng = np.random.default_rng(seed)
    lines = []
    for i, label in enumerate(labels):
        name = f"{i:05d}"
        write_wav(out / "audio" / f"{name}.wav", dtmf_tone(label, rng))
        record = {
            "image": f"images/{name}.png",
            "audio": f"audio/{name}.wav",
            "caption": digit_captions(label),
            "audio_caption": digit_tone_captions(label),
            "label": label,
        }
        lines.append(json.dumps(record))
    train, val = split_indices(len(lines), VAL_FRACTION, seed)
    for split, indices in (("train", train), ("val", val)):
        (out / f"{split}.jsonl").write_text("".join(lines[i] + "\n" for i in indices))
    return out


def write_digit_images(out_dir: str | Path, limit: int | None = None) -> list[str]:
    """Writes scikit-learn's handwritten digits as `out_dir/images/NNNNN.png` (8-bit greyscale, 8x8), in order.

    Args:
        out_dir: the directory to write into; `images/` is created in it if missing.
        limit: write only the first `limit` images.

    Returns:
        The label of each image written, "0".."9", in file order.
    """
    # Imported here: scikit-learn takes a second to import, and only this function needs it.
    from sklearn.datasets import load_digits

    folder = Path(out_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pixels = np.round(digits.images[:limit] * (255 / 16)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i:05d}.png")  # (8, 8) uint8 -> mode L
    return [str(int(t)) for t in digits.target[:limit]]


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Writes float samples in [-1, 1] to `path` as a mono 16-bit PCM WAV file."""
    # Encoded in memory: libsndfile syncs every file it closes to disk, which makes 1,797 files take seconds.
    wav = io.BytesIO()
    soundfile.write(wav, samples, sample_rate, subtype="PCM_16", format="WAV")
    path.write_bytes(wav.getvalue())


def _check_digit(digit: int | str) -> str:
    text = str(digit)
    if isinstance(digit, bool) or text not in DTMF_FREQUENCIES:
        raise ValueError(f"digit must be 0..9 (an int or a str), got {digit!r}")
    return text
