"""Waveform front-end of the AST-style audio encoder: load, downmix, resample, kaldi fbank, pad or crop, normalise.

The output matches what AST (and Hugging Face's `ASTFeatureExtractor`) feed the model: a (frames, mel bins)
log-mel spectrogram per clip, computed with `torchaudio.compliance.kaldi.fbank`, padded or cropped to a fixed number
of frames and normalised as `(fbank - norm_mean) / (2 * norm_std)`.
"""

from __future__ import annotations

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

AudioItem = str | os.PathLike | tuple[np.ndarray | Tensor, int]


class AudioProcessor:
    """Turns audio items (paths or `(waveform, sample_rate)` pairs) into normalised log-mel spectrograms.

    Args:
        config: the audio encoder config; its sample rate, fbank, pad/crop and normalisation fields are used.
    """

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
        mono, then the clip is resampled with `torchaudio.functional.resample` if its rate differs from
        `config.sample_rate`.

        Args:
            item: a path (str or `os.PathLike`) or a `(waveform, sample_rate)` pair.
            index: the item's position in a batch, named in error messages.

        Returns:
            The waveform, shape (T,).

        Raises:
            InputError: the file is missing or unreadable, or the waveform is empty, has NaN/Inf samples, an
                unsupported dtype or layout, or comes without a valid sample rate; the message names the item.
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

        waveform = waveform.mean(dim=0)  # (C, T) -> (T,)
        if sample_rate != self.config.sample_rate:
            waveform = torchaudio.functional.resample(waveform, sample_rate, self.config.sample_rate)
        return waveform

    def features(self, waveform: Tensor) -> Tensor:
        """Computes AST's normalised kaldi log-mel fbank of one mono waveform.

        A clip shorter than one analysis window is zero-padded to one window first, so it yields one frame.
        Clips with fewer than `config.target_frames` frames are filled to that length: pad_mode "zeros" appends
        all-zero fbank rows (before normalisation, as AST does), "repeat" tiles the clip's frames from its start.
        Longer clips are cropped: crop "start" keeps the first frames, "center" the middle ones (a frame left of
        centre when the excess is odd).

        Args:
            waveform: mono samples at `config.sample_rate`, shape (T,), as `load` returns them.

        Returns:
            Normalised features, shape (target_frames, num_mel_bins).
        """
        cfg = self.config
        if waveform.dim() != 1:
            raise InputError(f"features expects a mono waveform of shape (T,), got shape {tuple(waveform.shape)}")
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
        return (fbank - cfg.norm_mean) / (2 * cfg.norm_std)

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
        batch = [self.features(self.load(item, index=i)) for i, item in enumerate(items)]
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
            waveform = torch.from_numpy(waveform)
        except TypeError:
            raise InputError(f"{where}: unsupported waveform dtype {waveform.dtype}") from None
    elif not isinstance(waveform, Tensor):
        raise InputError(f"{where}: the waveform must be a numpy array or torch tensor, got {type(waveform).__name__}")
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
