"""Speech synthesis with eSpeak NG: a text and a voice in, a deterministic 16 kHz waveform out.

The `espeakng-loader` wheel ships libespeak-ng and its data; this module drives the library's C API through ctypes,
so no system package and no subprocess are needed. A voice is an espeak-ng language, the name of a file under
espeak-ng-data/lang ("en", "en-us", "en-gb-x-rp", "fr", ...; `list_languages()`), optionally followed by one
variant, a file under espeak-ng-data/voices/!v ("en+m3", "en-us+f2", "en+whisper", ...; `list_variants()`):

```python
from mmfm.data.speech import speak

wave = speak("seven", "en-gb-x-rp+f2", rate=150, pitch=60)  # float32, 16 kHz, about half a second
```

The same text, voice, rate and pitch give the same samples, bit for bit, in any process and at any time:

- libespeak-ng keeps synthesis state in static variables that neither `espeak_Terminate` nor a new
  `espeak_Initialize` resets (the pitch flutter's phase, the gain control, the glottal cycle count), so a word came
  out a few samples longer or shorter depending on what was spoken before it. Each call therefore loads a private
  copy of the library, speaks, and unloads it again: under a millisecond, and the copy shares no state with anything
  else in the process that loads libespeak-ng.
- `espeak_Initialize` seeds the noise of breathy and Klatt voices with the time of day; each call reseeds it.
- The speechPlayer variants draw their noise from the C library's `rand()`; `list_variants` leaves them out.

A lock serialises the calls, since the library's state is global.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import functools
import math
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import espeakng_loader
import numpy as np

from mmfm.errors import InputError

SAMPLE_RATE = 16000
# Words per minute: espeak-ng's espeakRATE_MINIMUM and espeakRATE_MAXIMUM.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 100)

# From espeak-ng's speak_lib.h.
# SYNCHRONOUS rather than RETRIEVAL: RETRIEVAL hands the text to a background thread and needs espeak_Synchronize
# to wait for it (about 20 ms a call, and a thread to stop before the library is unloaded); SYNCHRONOUS synthesises
# in the calling thread and calls the callback there, before espeak_Synth returns.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_CHARS_UTF8 = 1
_PARAMETER_RATE = 1
_PARAMETER_PITCH = 3
_EE_OK = 0
_NOISE_SEED = 1  # what the espeak-ng program seeds with for repeatable output
_SPEECH_PLAYER = re.compile(rb"^\s*klatt\s+6\b", re.MULTILINE)  # a variant file's line choosing speechPlayer
# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 0 continues the synthesis
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# The windowed-sinc resampler: the sinc's zero crossings kept on each side, and its cutoff as a fraction of the lower
# of the two Nyquist frequencies (a little below it, so that the transition band does not alias).
_SINC_ZEROS = 8
_ROLLOFF = 0.95

_lock = threading.Lock()
_unload = _ctypes.FreeLibrary if sys.platform == "win32" else _ctypes.dlclose


def list_languages() -> list[str]:
    """The languages a voice can name, e.g. ["af", "am", ..., "en", "en-029", "en-gb-scotland", ...], sorted."""
    return sorted(_languages())


def list_variants() -> list[str]:
    """The voice variants of espeak-ng-data/voices/!v that speak repeatably, e.g. ["Alex", ..., "m3", ..., "zac"].

    Left out are those of the speechPlayer synthesiser ("klatt 6": adam, benjamin, caleb, david, edward2, klatt6,
    mike2, Reed), which draws its noise from the C library's rand(): no espeak-ng call seeds it.
    """
    return sorted(name for name, repeatable in _variants().items() if repeatable)


def speak(
    text: str, voice: str = "en", *, rate: int = 175, pitch: int = 50, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Speaks `text` with an espeak-ng voice.

    espeak-ng's own short silences before and after the speech (up to about 20 ms and 90 ms) are kept: a clip
    starts and ends quietly, without cutting into a soft first or last sound.

    Args:
        text: what to say, e.g. "seven".
        voice: a language from `list_languages()` (any case), optionally with "+variant" from `list_variants()`,
            e.g. "en", "en-us+f2", "en-gb-x-rp+whisper".
        rate: speed in words per minute, 80..450.
        pitch: base pitch, 0..100 (50 is the voice's own).
        sample_rate: samples per second of the result; espeak-ng's own rate (22,050 Hz) is resampled to it.

    Returns:
        float32 mono samples in [-1, 1], shape (T,).

    Raises:
        InputError: `text` is empty, the voice's language or variant is unknown, `rate`, `pitch` or `sample_rate`
            is out of range, or espeak-ng says nothing for `text`.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"text to speak must be a non-empty str, got {text!r}")
    identifier = _voice_identifier(voice)
    for name, value, (low, high) in (("rate", rate, RATE_RANGE), ("pitch", pitch, PITCH_RANGE)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise InputError(f"sample_rate must be a positive int, got {sample_rate!r}")
    with _lock:
        samples, native_rate = _synthesize(text, identifier, voice, rate, pitch)
    if not samples.size:
        raise InputError(f"espeak-ng says nothing for {text!r} with voice {voice!r}")
    wave = resample(samples.astype(np.float32) / np.float32(32768), native_rate, sample_rate)
    return np.clip(wave, -1, 1, out=wave)  # the resampling filter can overshoot a full-scale peak a little


def resample(samples: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling with a Hann-windowed sinc, one filter per output phase (polyphase).

    Args:
        samples: float32 mono samples, shape (T,).
        orig_rate: their samples per second.
        new_rate: samples per second wanted.

    Returns:
        float32 samples at `new_rate`, shape (ceil(T * new_rate / orig_rate),).
    """
    if orig_rate == new_rate:
        return samples
    common = math.gcd(orig_rate, new_rate)
    up, down = new_rate // common, orig_rate // common
    bank, half = _sinc_bank(up, down)  # (up, 2 * half)
    n_out = -(-len(samples) * up // down)
    # output m lies at input position (m * down) / up: a whole sample `start` plus `phase` / up
    start, phase = np.divmod(np.arange(n_out) * down, up)  # (n_out,), (n_out,)
    padded = np.pad(samples, (half, half))
    # row m: inputs start - half + 1 .. start + half, which are padded[start + 1 .. start + 2 * half]
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half)[start + 1]  # (n_out, 2 * half)
    return np.einsum("mt,mt->m", windows, bank[phase]).astype(np.float32)


@functools.cache
def _sinc_bank(up: int, down: int) -> tuple[np.ndarray, int]:
    """The filters of `resample`: (up, 2 * half) weights, and `half`, the taps on each side of an output."""
    cutoff = _ROLLOFF * min(1.0, up / down)  # as a fraction of the input's Nyquist frequency
    half = math.ceil(_SINC_ZEROS / cutoff)
    # distance of each tap from the output position, in input samples: tap t sits at start - half + 1 + t
    distance = np.arange(1 - half, half + 1)[None, :] - np.arange(up)[:, None] / up  # (up, 2 * half)
    window = np.cos(np.pi * np.clip(distance / half, -1, 1) / 2) ** 2  # Hann, zero at +-half
    return (cutoff * np.sinc(cutoff * distance) * window).astype(np.float32), half


@functools.cache
def _variants() -> dict[str, bool]:
    """Every variant's name -> whether it speaks repeatably (see `list_variants`)."""
    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    return {path.name: not _SPEECH_PLAYER.search(path.read_bytes()) for path in folder.iterdir()}


@functools.cache
def _languages() -> dict[str, str]:
    """Lower-case language name -> its file's path under espeak-ng-data/lang, e.g. "en-us" -> "gmw/en-US"."""
    root = Path(espeakng_loader.get_data_path()) / "lang"
    return {path.name.lower(): path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def _voice_identifier(voice: str) -> str:
    """The name espeak_SetVoiceByName loads fastest for `voice`: the language's file path, then any "+variant"."""
    if not isinstance(voice, str):
        raise InputError(f"voice must be a str such as 'en' or 'en-us+f2', got {voice!r}")
    language, plus, variant = voice.partition("+")
    if language.lower() not in _languages():
        raise InputError(
            f"unknown voice {voice!r}: no language {language!r} in espeak-ng-data/lang "
            "(mmfm.data.speech.list_languages() names them, e.g. 'en', 'en-us', 'en-gb-x-rp')"
        )
    # espeak-ng ignores an unknown variant without a word, so it is checked here
    if plus and variant not in _variants():
        raise InputError(
            f"unknown voice {voice!r}: no variant {variant!r} in espeak-ng-data/voices/!v "
            "(mmfm.data.speech.list_variants() names them, e.g. 'm3', 'f2', 'croak', 'whisper')"
        )
    if plus and not _variants()[variant]:
        raise InputError(
            f"voice {voice!r}: variant {variant!r} uses espeak-ng's speechPlayer synthesiser, whose noise cannot be "
            "repeated; mmfm.data.speech.list_variants() names the others"
        )
    return _languages()[language.lower()].lower() + plus + variant


@functools.cache
def _private_copy() -> tuple[str, str]:
    """This process's copy of libespeak-ng and the data folder it reads, both removed when the process exits.

    The data folder links to the wheel's, except that its language files are copied under lower-case names:
    espeak_SetVoiceByName lower-cases a name before it looks for the file, and only when that fails does it read
    every voice file to match names (3-4 ms a call for "gmw/en-US", where "gmw/en" takes none).
    """
    folder = Path(tempfile.mkdtemp(prefix="mmfm-espeak-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    source = Path(espeakng_loader.get_data_path())
    data = folder / "espeak-ng-data"
    data.mkdir()
    for entry in source.iterdir():
        if entry.name != "lang":
            (data / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for path in _languages().values():
        target = data / "lang" / path.lower()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / "lang" / path, target)
    return shutil.copy(espeakng_loader.get_library_path(), folder), str(data)


def _synthesize(text: str, identifier: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's int16 samples for `text` and their sample rate, from a freshly loaded library (see above)."""
    chunks: list[np.ndarray] = []

    def collect(wav: ctypes._Pointer, count: int, events: int | None) -> int:
        if count > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    callback = _SynthCallback(collect)  # referenced until espeak_Synth has returned
    library, data_path = _private_copy()
    lib = ctypes.CDLL(library)
    try:
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint]
        lib.espeak_Synth.argtypes += [ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if native_rate <= 0:
            raise RuntimeError(f"libespeak-ng did not start with the data in {data_path} (error {native_rate})")
        try:
            lib.espeak_SetSynthCallback(callback)
            lib.espeak_ng_SetRandSeed(_NOISE_SEED)  # espeak_Initialize seeded it with the time of day
            if lib.espeak_SetVoiceByName(identifier.encode()) != _EE_OK:
                raise InputError(f"espeak-ng cannot load voice {voice!r} (as {identifier!r})")
            lib.espeak_SetParameter(_PARAMETER_RATE, rate, 0)
            lib.espeak_SetParameter(_PARAMETER_PITCH, pitch, 0)
            encoded = text.encode() + b"\0"
            status = lib.espeak_Synth(encoded, len(encoded), 0, 0, 0, _CHARS_UTF8, None, None)
            if status != _EE_OK:
                raise RuntimeError(f"libespeak-ng failed to speak {text!r} (error {status})")
        finally:
            lib.espeak_Terminate()
    finally:
        _unload(lib._handle)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return samples, native_rate
