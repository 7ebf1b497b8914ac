"""Spoken words from espeak-ng through ctypes: the same request gives the same samples, whatever was said before."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mmfm.data import speak
from mmfm.data.speech import list_languages, list_variants, resample
from mmfm.errors import InputError


def test_the_same_request_gives_the_same_samples_even_after_other_speech():
    first = speak("seven", "en+m3", rate=150, pitch=40)
    speak("two", "en-us+whisper", rate=300, pitch=90)  # libespeak-ng keeps state that used to leak into the next
    assert np.array_equal(speak("seven", "en+m3", rate=150, pitch=40), first)
    higher = speak("seven", "en+m3", rate=150, pitch=60)
    assert higher.shape != first.shape or not np.array_equal(higher, first)


def test_a_breathy_voice_repeats_in_the_next_second():
    # espeak_Initialize seeds the breath noise with the time in seconds
    first = speak("one", "en+whisper")
    time.sleep(1.01 - time.time() % 1)
    assert np.array_equal(speak("one", "en+whisper"), first)


def test_calls_from_several_threads_give_what_serial_calls_give():
    requests = [("three", "en-us"), ("four", "en+f2"), ("five", "en-gb-x-rp+croak"), ("six", "en")] * 2
    serial = [speak(word, voice) for word, voice in requests]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda request: speak(*request), requests))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded))


@pytest.mark.parametrize("voice", ["en", "en-us+f2", "en-gb-x-rp+whisper", "EN-US"])
def test_a_digit_word_is_audible_for_a_plausible_time(voice):
    wave = speak("zero", voice)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.2 <= len(wave) / 16000 <= 1.5
    assert 0.05 < np.abs(wave).max() <= 1 and np.sqrt(np.mean(wave**2)) > 0.01
    assert len(speak("zero", voice, sample_rate=8000)) == pytest.approx(len(wave) / 2, abs=1)


def test_a_slower_rate_speaks_longer():
    assert len(speak("nine", rate=100)) > 1.5 * len(speak("nine", rate=300))


def test_languages_and_variants_are_listed():
    assert {"en", "en-us", "en-gb-x-rp", "fr"} <= set(list_languages())
    assert {"m3", "f2", "croak", "whisper"} <= set(list_variants())
    assert "Reed" not in list_variants()  # speechPlayer's noise comes from the C library's rand()


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"text": "one", "voice": "xx-nowhere"}, "'xx-nowhere'"),
        ({"text": "one", "voice": "en+nobody"}, "'nobody'"),
        ({"text": "one", "voice": "en+Reed"}, "'Reed' uses espeak-ng's speechPlayer"),
        ({"text": "  "}, "text"),
        ({"text": "one", "rate": 79}, "rate"),
        ({"text": "one", "rate": 451}, "rate"),
        ({"text": "one", "pitch": -1}, "pitch"),
        ({"text": "one", "pitch": 50.5}, "pitch"),
        ({"text": "one", "sample_rate": 0}, "sample_rate"),
    ],
)
def test_bad_requests_raise_input_error_naming_the_input(kwargs, named):
    with pytest.raises(InputError, match=named):
        speak(**kwargs)


def test_resampling_keeps_a_tone_below_the_new_nyquist_and_removes_one_above():
    t = np.arange(22050, dtype=np.float32) / 22050
    kept = resample(np.sin(2 * np.pi * 1000 * t), 22050, 16000)
    removed = resample(np.sin(2 * np.pi * 10000 * t), 22050, 16000)  # would alias to 6 kHz
    assert kept.dtype == np.float32 and len(kept) == 16000
    expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    assert np.abs(kept - expected)[100:-100].max() < 0.01
    assert np.abs(removed)[100:-100].max() < 0.02
