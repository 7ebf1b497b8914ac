"""Waveform front-end of the AST-style audio encoder: load, downmix, resample, kaldi fbank, pad or crop, normalise.

The output matches what AST (and Hugging Face's `ASTFeatureExtractor`) feed the model: a (frames, mel bins)
log-mel spectrogram per clip, computed with `torchaudio.compliance.kaldi.fbank`, padded or cropped to a fixed number
of frames and normalised as `(fbank - norm_mean) / (2 * norm_std)`.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional
from torch import Tensor

from mmfm.config import AudioEncoderConfig
from mmfm.errors import InputError

MAX_CHANNELS = 8

# torchaudio's resampler builds a (new, 1, 2 * width + orig) kernel for the rates reduced by their gcd and convolves
# with it, so its cost grows with the product of the reduced rates (16001 -> 16000 Hz: gigabytes). It is used while
# both reduced rates are at most this (every common rate to 16 kHz: 44.1 kHz is 441/160, 11.025 kHz 441/640); other
# ratios go through `_sinc_resample`, the same filter evaluated tap by tap, whose cost is proportional to the clip.
_TORCHAUDIO_MAX_REDUCED_RATE = 1024
# torchaudio's defaults: a Hann-windowed sinc, 6 zero crossings each side, cut-off at 99% of the lower Nyquist rate.
_FILTER_ZERO_CROSSINGS = 6
_ROLLOFF = 0.99
# (outputs, taps) elements evaluated at once by `_sinc_resample`: bounds its memory (a few float64 arrays of this).
_CHUNK_ELEMENTS = 1 << 20

AudioItem = str | os.PathLike | tuple[np.ndarray | Tensor, int]


class AudioProcessor:
    """Turns audio items (paths or `(waveform, sample_rate)` pairs) into normalised log-mel spectrograms.

    Args:
        config: the audio encoder config; its sample rate, fbank, pad/crop and normalisation fields are used.

    Attributes:
        min_sample_rate, max_sample_rate: the sample rates accepted besides `config.sample_rate`, in Hz (default
            1 kHz to 384 kHz). Resampling costs time and memory proportional to the clip at any rate; the bounds
            keep the resampled clip at most `config.sample_rate / min_sample_rate` times as long as the input and
            refuse nonsense rates. Set them on the class
            (`AudioProcessor.max_sample_rate = 768_000`) or on one processor (`model.processors["audio"]`).
        max_amplitude: the largest absolute sample value accepted (default 1e10, far above the [-1, 1] of float
            audio and the +-32768 of int16-scaled floats); louder clips overflow the fbank's float32 power spectrum.
    """

    min_sample_rate: int = 1_000
    max_sample_rate: int = 384_000
    max_amplitude: float = 1e10

    @classmethod
    def for_encoder(cls, encoder: Any, config: AudioEncoderConfig) -> AudioProcessor:
        """The processor of an `AudioEncoder` built from `config`."""
        return cls(config)

    def __init__(self, config: AudioEncoderConfig) -> None:
        self.config = config

    def load(self, item: AudioItem, index: int | None = None) -> Tensor:
        """Reads one audio item as a mono float32 waveform at `config.sample_rate`.

        An item is a path to a file `soundfile` can read, or a `(waveform, sample_rate)` tuple whose waveform is a
        numpy array or torch tensor and whose sample rate is a positive int. A 1-D waveform is mono. For a 2-D
        waveform the shorter axis is the channel axis (the first one when both are equally long), so (C, T) and
        (T, C) both work; it may have at most 8 channels. Integer waveforms are scaled to [-1, 1) by
        2 ** (bits - 1), unsigned ones (8-bit WAV) first centred on 2 ** (bits - 1). Channels are averaged to
        mono, then the clip is resampled to `config.sample_rate` by `resample` if its rate differs. A rate that
        needs resampling must lie in `min_sample_rate..max_sample_rate`; no sample may exceed `max_amplitude`.

        Args:
            item: a path (str or `os.PathLike`) or a `(waveform, sample_rate)` pair.
            index: the item's position in a batch, named in error messages.

        Returns:
            The waveform, shape (T,).

        Raises:
            InputError: the file is missing or unreadable, or the waveform is empty, has NaN/Inf samples or
                samples beyond `max_amplitude`, an unsupported dtype or layout, or comes without a valid sample
                rate or with one outside `min_sample_rate..max_sample_rate`; the message names the item.
        """
        where = _describe(item, index)
        if isinstance(item, (str, os.PathLike)):
            waveform, sample_rate = _read_file(item, where)  # (C, T)
        elif isinstance(item, (np.ndarray, Tensor)):
            raise InputError(f"{where}: a bare waveform has no sample rate; pass a (waveform, sample_rate) pair")
        elif isinstance(item, tuple) and len(item) == 2:
            waveform, sample_rate = _check_pair(*item, where)  # (C, T)
        else:
            raise InputError(f"{where}: expected a path or a (waveform, sample_rate) pair, got {type(item).__name__}")

        if waveform.numel() == 0:
            raise InputError(f"{where}: the waveform is empty (shape {tuple(waveform.shape)})")
        if waveform.isnan().any():
            raise InputError(f"{where}: the waveform contains NaN samples")
        if waveform.isinf().any():
            raise InputError(f"{where}: the waveform contains Inf samples")
        peak = waveform.abs().max().item()
        if peak > self.max_amplitude:
            raise InputError(
                f"{where}: the waveform's peak amplitude {peak:.3g} is above the limit {self.max_amplitude:.3g} "
                "(float waveforms are expected in [-1, 1]; AudioProcessor.max_amplitude sets the limit)"
            )
        if sample_rate != self.config.sample_rate and not self.min_sample_rate <= sample_rate <= self.max_sample_rate:
            raise InputError(
                f"{where}: the sample rate {sample_rate} Hz is outside the supported range "
                f"{self.min_sample_rate}..{self.max_sample_rate} Hz "
                "(AudioProcessor.min_sample_rate and max_sample_rate set it)"
            )

        waveform = waveform.mean(dim=0)  # (C, T) -> (T,)
        if sample_rate != self.config.sample_rate:
            waveform = resample(waveform, sample_rate, self.config.sample_rate)
        return waveform

    def features(self, waveform: Tensor, index: int | None = None) -> Tensor:
        """Computes AST's normalised kaldi log-mel fbank of one mono waveform.

        A clip shorter than one analysis window is zero-padded to one window first, so it yields one frame.
        Clips with fewer than `config.target_frames` frames are filled to that length: pad_mode "zeros" appends
        all-zero fbank rows (before normalisation, as AST does), "repeat" tiles the clip's frames from its start.
        Longer clips are cropped: crop "start" keeps the first frames, "center" the middle ones (a frame left of
        centre when the excess is odd).

        Args:
            waveform: mono samples at `config.sample_rate`, shape (T,), as `load` returns them.
            index: the clip's position in a batch, named in error messages.

        Returns:
            Normalised features, shape (target_frames, num_mel_bins).

        Raises:
            InputError: the waveform is not 1-D, or its features are not finite (NaN or Inf: a waveform far
                louder than [-1, 1] overflows the power spectrum).
        """
        cfg = self.config
        where = "audio" if index is None else f"audio {index}"
        if waveform.dim() != 1:
            raise InputError(f"{where}: features expects a mono waveform of shape (T,), got {tuple(waveform.shape)}")
        # the same arithmetic as kaldi's window size, so a padded clip gives exactly one frame
        window = int(cfg.sample_rate * cfg.frame_length_ms * 0.001)
        if waveform.shape[0] < window:
            waveform = F.pad(waveform, (0, window - waveform.shape[0]))
        fbank = kaldi.fbank(
            waveform.unsqueeze(0),  # (1, T)
            htk_compat=True,
            sample_frequency=cfg.sample_rate,
            use_energy=False,
            window_type=cfg.window,
            num_mel_bins=cfg.num_mel_bins,
            dither=cfg.dither,
            frame_length=cfg.frame_length_ms,
            frame_shift=cfg.frame_shift_ms,
        )  # (frames, mel)
        fbank = self._fit_frames(fbank)  # (target_frames, mel)
        features = (fbank - cfg.norm_mean) / (2 * cfg.norm_std)
        if not features.isfinite().all():
            peak = waveform.abs().max().item() if waveform.isfinite().all() else float("nan")
            raise InputError(
                f"{where}: the log-mel features contain NaN or Inf (waveform peak amplitude {peak:.3g}; "
                "float waveforms are expected in [-1, 1])"
            )
        return features

    def __call__(self, items: AudioItem | list[AudioItem] | tuple[AudioItem, ...]) -> Tensor:
        """Loads and featurises a batch of audio items.

        Args:
            items: a list (or tuple) of paths and `(waveform, sample_rate)` pairs; a single path or pair is also
                accepted and makes a batch of one.

        Returns:
            float32 features, shape (B, target_frames, num_mel_bins): the layout of AST's input_values.

        Raises:
            InputError: the batch is empty, or an item cannot be loaded; the message gives the item's index.
        """
        if not isinstance(items, (list, tuple)) or _is_pair(items):
            items = [items]
        if not items:
            raise InputError("no audio given: expected a non-empty list of audio items")
        batch = [self.features(self.load(item, index=i), index=i) for i, item in enumerate(items)]
        return torch.stack(batch)  # (B, target_frames, mel)

    def _fit_frames(self, fbank: Tensor) -> Tensor:
        """Pads or crops (frames, mel) features to (target_frames, mel) following pad_mode and crop."""
        num_frames, target = fbank.shape[0], self.config.target_frames
        if num_frames < target:
            if self.config.pad_mode == "repeat":
                copies = -(-target // num_frames)
                return fbank.repeat(copies, 1)[:target]
            return F.pad(fbank, (0, 0, 0, target - num_frames))
        start = (num_frames - target) // 2 if self.config.crop == "center" else 0
        return fbank[start : start + target]


def resample(waveform: Tensor, orig_freq: int, new_freq: int) -> Tensor:
    """Resamples float samples (..., T) from `orig_freq` to `new_freq` Hz with torchaudio's windowed-sinc filter.

    The result is that of `torchaudio.functional.resample` with its defaults (Hann-windowed sinc, 6 zero crossings,
    rolloff 0.99), (..., ceil(T * new_freq / orig_freq)) samples. Rates whose ratio reduces to small terms (every
    common rate to 16 kHz) go through torchaudio itself, bit for bit; other ratios (16001 -> 16000 Hz, where
    torchaudio builds a 16000 x 16001 kernel) through `_sinc_resample`, which evaluates the same filter at each
    output sample, so time and memory stay proportional to the clip whatever the rates.
    """
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(orig_freq, new_freq)
    if max(orig_freq, new_freq) // gcd <= _TORCHAUDIO_MAX_REDUCED_RATE:
        return torchaudio.functional.resample(waveform, orig_freq, new_freq)
    return _sinc_resample(waveform, orig_freq, new_freq)


def _sinc_resample(waveform: Tensor, orig_freq: int, new_freq: int) -> Tensor:
    """torchaudio's resampling filter, evaluated output by output: O(T_out * taps) time, memory bounded per chunk.

    Output sample j lies at input position c = j * orig / new (rates reduced by their gcd) and is
    sum_m x[m] * h(m - c), with h torchaudio's kernel: scale * sinc(pi t) * cos(pi t / (2 * zeros)) ** 2 for
    t = (m - c) * base / orig clamped to +-zeros, base = 0.99 * min(orig, new), scale = base / orig; samples
    outside the clip are zeros. h vanishes for |m - c| >= half = ceil(zeros * orig / base), so 2 * half + 1 taps
    around floor(c) cover it.
    """
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    base = min(orig, new) * _ROLLOFF
    zeros = _FILTER_ZERO_CROSSINGS
    half = math.ceil(zeros * orig / base)
    shape, length = waveform.shape[:-1], waveform.shape[-1]
    out_length = -(-new * length // orig)  # ceil(T * new / orig)

    rows = waveform.reshape(-1, length).double()  # (R, T)
    padded = F.pad(rows, (half, half + 1))  # (R, T + 2 * half + 1): index m + half holds x[m]
    offsets = torch.arange(-half, half + 1)  # (taps,)
    out = torch.empty(rows.shape[0], out_length, dtype=torch.float64)  # (R, T_out)
    chunk = max(1, _CHUNK_ELEMENTS // offsets.numel())
    for start in range(0, out_length, chunk):
        j = torch.arange(start, min(start + chunk, out_length), dtype=torch.int64)  # (n,)
        floor_c = torch.div(j * orig, new, rounding_mode="floor")  # (n,)
        frac_c = (j * orig - floor_c * new).double() / new  # (n,) c - floor(c), in [0, 1)
        t = (offsets.double()[None, :] - frac_c[:, None]) * (base / orig)  # (n, taps)
        t = t.clamp_(-zeros, zeros)
        window = torch.cos(t * (math.pi / zeros / 2)) ** 2
        t = t * math.pi
        sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
        kernel = sinc * window * (base / orig)  # (n, taps)
        samples = padded[:, floor_c[:, None] + offsets[None, :] + half]  # (R, n, taps)
        out[:, start : start + j.numel()] = (samples * kernel).sum(dim=-1)
    return out.to(waveform.dtype).reshape(*shape, out_length)


def _describe(item: Any, index: int | None) -> str:
    """Names an item in error messages: its path, or its batch index and kind."""
    if isinstance(item, (str, os.PathLike)):
        what = str(Path(item))
    elif _is_pair(item):
        what = "(waveform, sample_rate) pair"
    else:
        what = type(item).__name__
    return f"audio {index} ({what})" if index is not None else f"audio ({what})"


def _is_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (np.ndarray, Tensor))


def _read_file(path: str | os.PathLike, where: str) -> tuple[Tensor, int]:
    """Reads an audio file as float32 (C, T) samples and its sample rate."""
    if not Path(path).is_file():
        raise InputError(f"{where}: file not found")
    try:
        samples, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)  # (T, C)
    except RuntimeError as e:  # soundfile.LibsndfileError is a RuntimeError
        raise InputError(f"{where}: not a readable audio file ({e})") from None
    return torch.from_numpy(samples).T, sample_rate  # (C, T)


def _check_pair(waveform: Any, sample_rate: Any, where: str) -> tuple[Tensor, int]:
    """Validates a (waveform, sample_rate) pair; returns float32 (C, T) samples and the rate."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Integral) or sample_rate <= 0:
        raise InputError(f"{where}: the sample rate must be a positive integer, got {sample_rate!r}")
    if isinstance(waveform, np.ndarray):
        try:
            waveform = torch.from_numpy(waveform if all(s >= 0 for s in waveform.strides) else waveform.copy())
        except TypeError:
            raise InputError(f"{where}: unsupported waveform dtype {waveform.dtype}") from None
    elif not isinstance(waveform, Tensor):
        raise InputError(f"{where}: the waveform must be a numpy array or torch tensor, got {type(waveform).__name__}")
    if waveform.is_meta:
        raise InputError(f"{where}: the waveform is a meta tensor, which holds no samples")
    if waveform.layout != torch.strided:
        raise InputError(f"{where}: the waveform is a {waveform.layout} tensor; pass a dense one")
    waveform = waveform.detach().cpu()
    if waveform.dtype == torch.bool or waveform.is_complex():
        raise InputError(f"{where}: unsupported waveform dtype {waveform.dtype}")
    if not waveform.is_floating_point():
        half_scale = 2.0 ** (torch.iinfo(waveform.dtype).bits - 1)
        offset = half_scale if torch.iinfo(waveform.dtype).min == 0 else 0.0  # unsigned PCM centres on half scale
        waveform = (waveform.double() - offset) / half_scale
    waveform = waveform.float()

    if waveform.dim() == 1:
        return waveform.unsqueeze(0), int(sample_rate)  # (T,) -> (1, T)
    if waveform.dim() != 2:
        raise InputError(f"{where}: the waveform must be (T,), (C, T) or (T, C), got shape {tuple(waveform.shape)}")
    if min(waveform.shape) > MAX_CHANNELS:
        raise InputError(
            f"{where}: cannot tell channels from time in shape {tuple(waveform.shape)}; the channel axis is the "
            f"shorter one and may have at most {MAX_CHANNELS} channels"
        )
    if waveform.shape[0] > waveform.shape[1]:
        waveform = waveform.T  # (T, C) -> (C, T)
    return waveform, int(sample_rate)
