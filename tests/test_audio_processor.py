"""AudioProcessor: loading, downmix, resampling, AST's kaldi fbank front-end, pad/crop, and input errors."""

import resource
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional
from torch.testing import assert_close

from mmfm.config import AudioEncoderConfig
from mmfm.encoders.audio_processor import AudioProcessor, _sinc_resample
from mmfm.errors import InputError


def tiny(**overrides) -> AudioEncoderConfig:
    return AudioEncoderConfig(num_mel_bins=32, target_frames=64, **overrides)


def noise(num_samples: int, channels: int | None = None, seed: int = 0) -> np.ndarray:
    """Float32 noise in [-0.5, 0.5], shape (T,) or (T, channels)."""
    shape = (num_samples,) if channels is None else (num_samples, channels)
    return (np.random.default_rng(seed).random(shape, dtype=np.float32) - 0.5).astype(np.float32)


def kaldi_reference(waveform: torch.Tensor, config: AudioEncoderConfig) -> torch.Tensor:
    """AST's fbank called directly with the config's settings, not yet padded, cropped or normalised."""
    return kaldi.fbank(
        waveform.unsqueeze(0),
        htk_compat=True,
        sample_frequency=config.sample_rate,
        use_energy=False,
        window_type=config.window,
        num_mel_bins=config.num_mel_bins,
        dither=0.0,
        frame_length=config.frame_length_ms,
        frame_shift=config.frame_shift_ms,
    )


def normalise(fbank: torch.Tensor, config: AudioEncoderConfig) -> torch.Tensor:
    return (fbank - config.norm_mean) / (2 * config.norm_std)


def features_of(config: AudioEncoderConfig, waveform, sample_rate: int) -> torch.Tensor:
    processor = AudioProcessor(config)
    return processor.features(processor.load((waveform, sample_rate)))


def test_default_front_end_equals_kaldi_fbank_with_ast_settings():
    config = AudioEncoderConfig()
    waveform = torch.from_numpy(noise(16000 * 3))  # 298 frames, zero-padded to 1024
    reference = kaldi_reference(waveform, config)
    assert reference.shape == (298, 128)
    expected = normalise(torch.cat([reference, torch.zeros(1024 - 298, 128)]), config)

    out = features_of(config, waveform, 16000)

    assert out.shape == (1024, 128) and out.dtype == torch.float32
    assert_close(out, expected, rtol=0, atol=0)


def test_non_default_front_end_equals_kaldi_fbank():
    config = AudioEncoderConfig(
        sample_rate=8000,
        num_mel_bins=40,
        target_frames=100,
        frame_length_ms=32.0,
        frame_shift_ms=5.0,
        window="hamming",
        norm_mean=-2.0,
        norm_std=3.0,
        crop="center",
    )
    waveform = torch.from_numpy(noise(8000))  # (8000 - 256) // 40 + 1 = 194 frames, centre 100 kept
    reference = kaldi_reference(waveform, config)
    assert reference.shape == (194, 40)

    out = features_of(config, waveform, 8000)

    assert_close(out, normalise(reference[47:147], config), rtol=0, atol=0)


def test_default_front_end_matches_hugging_face_ast_feature_extractor():
    transformers = pytest.importorskip("transformers")
    # without torchaudio, transformers falls back to a numpy fbank that is close but not identical
    assert transformers.utils.is_speech_available()
    extractor = transformers.ASTFeatureExtractor()
    processor = AudioProcessor(AudioEncoderConfig())
    for seconds in (4, 12):  # padded and truncated to 1024 frames
        waveform = noise(16000 * seconds, seed=seconds) * 0.8
        expected = extractor(waveform, sampling_rate=16000, return_tensors="pt").input_values[0]

        out = processor([(waveform, 16000)])[0]

        assert_close(out, expected, rtol=0, atol=0)


def test_stereo_44k_wav_equals_manual_downmix_and_resample(tmp_path: Path):
    config = tiny()
    stereo = noise(44100, channels=2)  # (T, C), 1 s
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, 44100, subtype="FLOAT")
    mono = torch.from_numpy(stereo).T.mean(dim=0)  # (T,)
    resampled = torchaudio.functional.resample(mono, 44100, 16000)
    processor = AudioProcessor(config)

    loaded = processor.load(path)

    assert loaded.dtype == torch.float32 and loaded.shape == (16000,)
    assert_close(loaded, resampled, rtol=0, atol=0)
    assert_close(processor([str(path)])[0], processor.features(resampled), rtol=0, atol=0)


def test_pcm16_wav_equals_int16_pair(tmp_path: Path):
    samples = (noise(16000, channels=2) * 30000).astype(np.int16)  # (T, C)
    path = tmp_path / "pcm16.wav"
    soundfile.write(path, samples, 16000, subtype="PCM_16")
    processor = AudioProcessor(tiny())

    assert_close(processor(path), processor([(samples, 16000)]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "scale", "offset"),
    [(np.int16, 2.0**15, 0), (np.int32, 2.0**31, 0), (np.uint8, 2.0**7, 2**7)],
)
def test_integer_waveform_equals_scaled_float(dtype, scale, offset):
    info = np.iinfo(dtype)
    ints = np.random.default_rng(1).integers(info.min, info.max, size=16000, endpoint=True).astype(dtype)
    floats = ((ints.astype(np.float64) - offset) / scale).astype(np.float32)
    processor = AudioProcessor(tiny())

    assert_close(processor.load((ints, 16000)), torch.from_numpy(floats), rtol=0, atol=0)
    assert_close(processor([(ints, 16000)]), processor([(floats, 16000)]), rtol=0, atol=0)


def test_channel_layouts_agree_and_downmix_by_mean():
    stereo = noise(16000, channels=2)  # (T, C)
    processor = AudioProcessor(tiny())
    mono = torch.from_numpy(stereo).mean(dim=1)

    as_time_channels = processor.load((stereo, 16000))
    as_channels_time = processor.load((torch.from_numpy(stereo.T.copy()), 16000))

    assert_close(as_time_channels, mono, rtol=0, atol=0)
    assert_close(as_channels_time, mono, rtol=0, atol=0)
    assert_close(processor.load((stereo[:, :1], 16000)), torch.from_numpy(stereo[:, 0]), rtol=0, atol=0)


def test_pair_at_other_rate_is_resampled():
    waveform = noise(8000)
    loaded = AudioProcessor(tiny()).load((waveform, 8000))

    assert loaded.shape == (16000,)
    assert_close(loaded, torchaudio.functional.resample(torch.from_numpy(waveform), 8000, 16000), rtol=0, atol=0)


def test_pad_zeros_appends_zero_fbank_rows():
    config = tiny(pad_mode="zeros")
    waveform = torch.from_numpy(noise(3200))  # (3200 - 400) // 160 + 1 = 18 frames
    clip = normalise(kaldi_reference(waveform, config), config)
    assert clip.shape[0] == 18

    out = features_of(config, waveform, 16000)

    assert_close(out[:18], clip, rtol=0, atol=0)
    padding_value = -config.norm_mean / (2 * config.norm_std)
    assert_close(out[18:], torch.full((64 - 18, 32), padding_value), rtol=0, atol=0)


def test_pad_repeat_tiles_the_clip():
    config = tiny(pad_mode="repeat")
    waveform = torch.from_numpy(noise(3200))  # 18 frames
    clip = normalise(kaldi_reference(waveform, config), config)

    out = features_of(config, waveform, 16000)

    assert_close(out[:18], clip, rtol=0, atol=0)
    assert_close(out[18], clip[0], rtol=0, atol=0)
    assert_close(out[40], clip[4], rtol=0, atol=0)
    assert_close(out[63], clip[63 % 18], rtol=0, atol=0)


def test_crop_start_keeps_first_frames_and_center_the_middle():
    waveform = torch.from_numpy(noise(16000))  # 98 frames; 64 kept
    clip = normalise(kaldi_reference(waveform, tiny()), tiny())
    assert clip.shape[0] == 98

    start = features_of(tiny(crop="start"), waveform, 16000)
    center = features_of(tiny(crop="center"), waveform, 16000)

    assert_close(start, clip[:64], rtol=0, atol=0)
    assert_close(center[0], clip[17], rtol=0, atol=0)
    assert_close(center[-1], clip[80], rtol=0, atol=0)
    assert not torch.equal(start[0], center[0])


def test_clip_shorter_than_one_window_is_padded_to_one_frame():
    config = tiny()
    waveform = torch.from_numpy(noise(100))  # a 25 ms window is 400 samples
    one_window = torch.cat([waveform, torch.zeros(300)])

    out = features_of(config, waveform, 16000)

    assert_close(out[0], normalise(kaldi_reference(one_window, config), config)[0], rtol=0, atol=0)
    assert_close(out[1:], torch.full((63, 32), -config.norm_mean / (2 * config.norm_std)), rtol=0, atol=0)


def test_call_batches_paths_and_pairs(tmp_path: Path):
    processor = AudioProcessor(tiny())
    path = tmp_path / "mono.flac"
    soundfile.write(path, noise(20000, seed=3), 16000)
    pair = (noise(12000, seed=4), 16000)

    batch = processor([path, pair])

    assert batch.shape == (2, 64, 32) and batch.dtype == torch.float32
    assert_close(batch[0], processor.features(processor.load(path)), rtol=0, atol=0)
    assert_close(batch[1], processor.features(processor.load(pair)), rtol=0, atol=0)
    assert_close(processor(pair), batch[1:], rtol=0, atol=0)
    assert_close(processor(str(path)), batch[:1], rtol=0, atol=0)


def test_missing_and_unreadable_files_name_the_path(tmp_path: Path):
    processor = AudioProcessor(tiny())
    good = (noise(16000), 16000)
    missing = tmp_path / "missing.wav"
    text = tmp_path / "notes.wav"
    text.write_text("not audio")

    with pytest.raises(InputError, match=r"audio 1 \(.*missing\.wav\): file not found"):
        processor([good, missing])
    with pytest.raises(InputError, match=r"audio 1 \(.*notes\.wav\): not a readable audio file"):
        processor([good, str(text)])
    with pytest.raises(InputError, match=r"notes\.wav"):
        processor.load(text)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ((np.zeros(0, dtype=np.float32), 16000), r"waveform is empty"),
        ((np.zeros((2, 0), dtype=np.float32), 16000), r"waveform is empty"),
        ((np.array([0.1, np.nan] * 500, dtype=np.float32), 16000), r"NaN"),
        ((torch.tensor([0.1, float("inf")] * 500), 16000), r"Inf"),
        ((np.zeros(1000, dtype=np.float32), 0), r"sample rate must be a positive integer, got 0"),
        ((np.zeros(1000, dtype=np.float32), -16000), r"sample rate must be a positive integer"),
        ((np.zeros(1000, dtype=np.float32), 16000.5), r"sample rate must be a positive integer, got 16000.5"),
        ((np.zeros((2, 2, 1000), dtype=np.float32), 16000), r"must be \(T,\), \(C, T\) or \(T, C\)"),
        ((np.zeros((16, 1000), dtype=np.float32), 16000), r"cannot tell channels from time"),
        ((np.zeros(1000, dtype=bool), 16000), r"unsupported waveform dtype"),
        (([0.0] * 1000, 16000), r"must be a numpy array or torch tensor"),
    ],
)
def test_bad_pairs_name_their_index(bad, message):
    processor = AudioProcessor(tiny())
    good = (noise(16000), 16000)

    with pytest.raises(InputError, match=r"audio 2 \(") as excinfo:
        processor([good, good, bad])
    assert excinfo.match(message)


@pytest.mark.parametrize("bare", [np.zeros(1000, dtype=np.float32), torch.zeros(1000)])
def test_bare_waveform_without_sample_rate_is_rejected(bare):
    processor = AudioProcessor(tiny())

    with pytest.raises(InputError, match=r"audio 1 \(.*no sample rate"):
        processor([(noise(16000), 16000), bare])
    with pytest.raises(InputError, match=r"no sample rate"):
        processor(bare)


def test_empty_batch_and_non_items_are_rejected():
    processor = AudioProcessor(tiny())

    with pytest.raises(InputError, match="non-empty list"):
        processor([])
    with pytest.raises(InputError, match=r"audio 0 \(int\): expected a path or a \(waveform, sample_rate\) pair"):
        processor([16000])
    with pytest.raises(InputError, match=r"audio 0 \(int\): expected a path"):
        processor(16000)
    with pytest.raises(InputError, match=r"audio 1 \(list\): expected a path or a \(waveform, sample_rate\) pair"):
        processor([(noise(1000), 16000), [noise(1000), 16000]])
    with pytest.raises(InputError, match=r"audio 0 \(ndarray\): a bare waveform has no sample rate"):
        processor([noise(1000), noise(1000)])


# ---- hostile and careless input (issue 11): bounded resampling, supported rates, loud clips ----

COMMON_RATES = [8000, 11025, 22050, 32000, 44100, 48000, 96000]


@pytest.mark.parametrize("rate", COMMON_RATES)
def test_common_rates_resample_exactly_as_torchaudio(rate):
    waveform = noise(rate // 10, seed=rate)

    loaded = AudioProcessor(tiny()).load((waveform, rate))

    assert_close(loaded, torchaudio.functional.resample(torch.from_numpy(waveform), rate, 16000), rtol=0, atol=0)


# 16496 / 16000 = 1031 / 1000 and 10010 / 16000 = 1001 / 1600 take the tap-by-tap path in `load`.
@pytest.mark.parametrize("rate", [*COMMON_RATES, 16496, 10010])
def test_tap_by_tap_resampler_equals_torchaudio_filter(rate):
    # The path taken for rates whose ratio does not reduce to small terms, checked where torchaudio is affordable:
    # to float32 rounding against torchaudio's filter computed in float64, and within torchaudio's own float32 error.
    waveform = torch.from_numpy(noise(rate // 10, seed=rate))  # 0.1 s
    reference64 = torchaudio.functional.resample(waveform.double(), rate, 16000)

    out = _sinc_resample(waveform, rate, 16000)

    assert out.dtype == torch.float32 and out.shape == reference64.shape
    assert_close(out.double(), reference64, rtol=0, atol=1e-6)
    assert_close(out, torchaudio.functional.resample(waveform, rate, 16000), rtol=0, atol=1e-4)


def test_tap_by_tap_resampler_upsamples_and_keeps_leading_dims():
    stereo = torch.from_numpy(noise(1600, channels=2).T.copy())  # (2, T)

    out = _sinc_resample(stereo, 16000, 44100)

    assert out.shape == (2, 4410)
    assert_close(out.double(), torchaudio.functional.resample(stereo.double(), 16000, 44100), rtol=0, atol=1e-6)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize("rate", [1000, 1001, 16001, 22051, 44099, 48001, 96001, 383999, 384000])
def test_any_rate_resamples_in_bounded_time_and_memory(rate):
    # torchaudio alone: 16001 Hz took 8.5 s and +4.1 GB for 0.1 s, 48001 Hz over 40 s and 9.8 GB.
    processor = AudioProcessor(tiny())
    waveform = noise(rate, seed=rate)  # 1 s
    processor.load((waveform[:100], rate))  # warm up
    rss_before = peak_rss_mb()
    start = time.perf_counter()

    loaded = processor.load((waveform, rate))

    assert time.perf_counter() - start < 1.5
    assert peak_rss_mb() - rss_before < 200
    assert loaded.shape == (16000,)
    assert loaded.isfinite().all()


def test_odd_rate_resampling_keeps_a_tone():
    # 16001 -> 16000 Hz is nearly the identity: a 440 Hz tone stays a 440 Hz tone of the same level.
    seconds = np.arange(16001) / 16001
    tone = (0.5 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)

    loaded = AudioProcessor(tiny()).load((tone, 16001))

    expected = 0.5 * torch.sin(2 * torch.pi * 440 * torch.arange(16000, dtype=torch.float64) / 16000)
    assert_close(loaded[200:-200].double(), expected[200:-200], rtol=0, atol=1e-3)


@pytest.mark.parametrize("rate", [1, 999, 384001, 10**9])
def test_rates_outside_the_supported_range_are_refused(rate):
    processor = AudioProcessor(tiny())

    with pytest.raises(InputError, match=rf"audio 1 \(.*sample rate {rate} Hz is outside .*1000\.\.384000 Hz"):
        processor([(noise(16000), 16000), (noise(1000), rate)])


def test_file_at_a_rate_outside_the_range_names_the_file(tmp_path: Path):
    path = tmp_path / "slow.wav"
    soundfile.write(path, noise(500), 500)

    with pytest.raises(InputError, match=r"slow\.wav.*sample rate 500 Hz is outside"):
        AudioProcessor(tiny())([path])


def test_supported_range_is_configurable(monkeypatch):
    processor = AudioProcessor(tiny())
    processor.min_sample_rate = 500
    assert processor.load((noise(500), 500)).shape == (16000,)

    monkeypatch.setattr(AudioProcessor, "max_sample_rate", 96000)
    with pytest.raises(InputError, match=r"outside the supported range 1000\.\.96000 Hz"):
        AudioProcessor(tiny()).load((noise(1000), 192000))


@pytest.mark.parametrize("amplitude", [1e11, 1e25, 3e38])
def test_absurdly_loud_audio_is_refused_by_name(amplitude):
    loud = (np.sign(noise(16000)) * amplitude).astype(np.float32)
    processor = AudioProcessor(tiny())

    with pytest.raises(InputError, match=r"audio 1 \(.*peak amplitude .* above the limit 1e\+10"):
        processor([(noise(16000), 16000), (loud, 16000)])


def test_loud_but_plausible_audio_is_accepted():
    # floats on int16's scale (what some loaders return) are loud but give finite features
    int16_scaled = noise(16000) * 65535

    features = AudioProcessor(tiny())([(int16_scaled, 16000)])

    assert features.isfinite().all()


def test_features_check_they_are_finite():
    processor = AudioProcessor(tiny())
    too_loud = torch.from_numpy(np.sign(noise(16000)) * 1e25).float()

    with pytest.raises(InputError, match=r"audio 4: the log-mel features contain NaN or Inf"):
        processor.features(too_loud, index=4)
    with pytest.raises(InputError, match=r"^audio: the log-mel features contain NaN or Inf"):
        processor.features(too_loud)


def test_the_model_rate_needs_no_range_check(monkeypatch):
    monkeypatch.setattr(AudioProcessor, "min_sample_rate", 20000)

    assert AudioProcessor(tiny()).load((noise(1000), 16000)).shape == (1000,)


def test_reversed_numpy_waveform_is_read():
    waveform = noise(16000)

    loaded = AudioProcessor(tiny()).load((waveform[::-1], 16000))

    assert_close(loaded, torch.from_numpy(waveform[::-1].copy()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("waveform", "message"),
    [
        (torch.empty(1000, device="meta"), "meta tensor"),
        (torch.zeros(1000).to_sparse(), "sparse"),
    ],
)
def test_tensors_without_samples_are_refused(waveform, message):
    with pytest.raises(InputError, match=rf"audio 0 \(.*{message}"):
        AudioProcessor(tiny())([(waveform, 16000)])
