"""Whisper's log-mel front end in torch: Slaney mel filters, 30 s windows, the 8-unit (80 dB) floor.

Matches openai-whisper's `whisper.audio.log_mel_spectrogram` (same STFT, same filters to float32
rounding), except that a batch is floored per utterance: each row's floor is its own max - 8, so a
batched call equals the per-utterance calls (openai-whisper floors a batch with one global max).

Example:
    >>> audio = torch.zeros(16000)                       # 1 s at 16 kHz
    >>> log_mel_spectrogram(pad_or_trim(audio)).shape    # one 30 s window
    torch.Size([80, 3000])
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from fxquant.errors import AudioError, ConfigError

__all__ = ["SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_LENGTH", "N_SAMPLES", "N_FRAMES",
           "mel_filters", "pad_or_trim", "log_mel_spectrogram"]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE     # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH         # 3000 mel frames in a 30 s window

# Slaney's mel scale (librosa htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_slaney_mel(hz: torch.Tensor) -> torch.Tensor:
    linear = hz / _F_SP
    log_part = _MIN_LOG_MEL + torch.log(torch.clamp(hz, min=_MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return torch.where(hz >= _MIN_LOG_HZ, log_part, linear)


def _slaney_mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    linear = mel * _F_SP
    log_part = _MIN_LOG_HZ * torch.exp(_LOG_STEP * (mel - _MIN_LOG_MEL))
    return torch.where(mel >= _MIN_LOG_MEL, log_part, linear)


@lru_cache(maxsize=8)
def _mel_filters_cached(n_mels: int) -> torch.Tensor:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels, htk=False, norm="slaney") in float64, as float32."""
    fft_freqs = torch.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)
    mel_edges = torch.linspace(0.0, float(_hz_to_slaney_mel(torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64))),
                               n_mels + 2, dtype=torch.float64)
    hz_edges = _slaney_mel_to_hz(mel_edges)                         # (n_mels + 2,)
    widths = hz_edges[1:] - hz_edges[:-1]                           # (n_mels + 1,)
    ramps = hz_edges[:, None] - fft_freqs[None, :]                  # (n_mels + 2, n_freqs)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(lower, upper), min=0.0)
    weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]      # Slaney: constant energy per band
    return weights.to(torch.float32)


def _filters(n_mels) -> torch.Tensor:
    """The cached bank after checking `n_mels` (shared, do not modify)."""
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or not 1 <= n_mels <= 256:
        raise ConfigError(f"n_mels must be an int in 1..256 (Whisper uses 80, large-v3 128), got {n_mels!r}")
    return _mel_filters_cached(n_mels)


def mel_filters(n_mels: int = 80) -> torch.Tensor:
    """Whisper's Slaney mel filter bank, shape (n_mels, N_FFT // 2 + 1) = (n_mels, 201), float32.

    Computed in float64 (cached) and returned as a fresh copy, so callers may modify it.

    Example:
        >>> fb = mel_filters(80)
        >>> fb.shape, fb.dtype
        (torch.Size([80, 201]), torch.float32)
    """
    return _filters(n_mels).clone()


def pad_or_trim(x: torch.Tensor, length: int = N_SAMPLES, dim: int = -1) -> torch.Tensor:
    """Zero-pad on the right or cut `x` along `dim` to exactly `length` (30 s of samples by default).

    Example:
        >>> pad_or_trim(torch.ones(5), 3).tolist(), pad_or_trim(torch.ones(2), 4).tolist()
        ([1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0])
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ConfigError(f"length must be a non-negative int, got {length!r}")
    x = torch.as_tensor(x)
    size = x.shape[dim]
    if size > length:
        return x.narrow(dim, 0, length)
    if size < length:
        pad = [0, 0] * x.dim()
        pad[2 * (x.dim() - 1 - (dim % x.dim())) + 1] = length - size   # F.pad lists the last dim first
        return F.pad(x, pad)
    return x


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """Whisper's log-mel features of 16 kHz audio: (N,) -> (n_mels, frames), (B, N) -> (B, n_mels, frames).

    STFT (n_fft 400, hop 160, periodic Hann, centred with reflect padding), the last frame
    dropped, power, Slaney mel, log10 of clamp(min=1e-10), floor at max - 8 per utterance,
    then (x + 4) / 4. `padding` zeros are appended first; frames = (N + padding) // 160.
    For one 30 s window pass `pad_or_trim(audio)`; openai-whisper's transcribe passes
    `padding=N_SAMPLES` and slices 3000-frame windows.

    Example:
        >>> log_mel_spectrogram(torch.zeros(2, 32000)).shape
        torch.Size([2, 80, 200])
    """
    return log_mel_from_power(power_spectrogram(audio, padding), n_mels)


def power_spectrogram(audio: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """|STFT|^2 of `log_mel_spectrogram`: (N,) -> (201, frames), (B, N) -> (B, 201, frames), the last frame
    dropped. A frame that sees only zeros is exactly 0, and each frame is computed on its own, so the
    spectrogram of a zero-padded signal is this one followed by zero columns.

    Example:
        >>> power_spectrogram(torch.zeros(3200)).shape
        torch.Size([201, 20])
    """
    audio = torch.as_tensor(audio)
    if audio.dim() not in (1, 2):
        raise ConfigError(f"audio must be (samples,) or (batch, samples), got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise ConfigError(f"audio must be a float tensor of samples in [-1, 1], got {audio.dtype}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding must be a non-negative int, got {padding!r}")
    audio = audio.to(torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise AudioError(f"audio of {audio.shape[-1]} samples is too short for Whisper's STFT (needs more than "
                         f"{N_FFT // 2}); pad it, e.g. pad_or_trim(audio) or padding=N_SAMPLES")
    window = torch.hann_window(N_FFT)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    return stft[..., :-1].abs() ** 2


def log_mel_from_power(magnitudes: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """The rest of `log_mel_spectrogram` on a power spectrogram (201, frames) or (B, 201, frames): Slaney mel,
    log10 of clamp(min=1e-10), floor at max - 8 per utterance, then (x + 4) / 4."""
    filters = _filters(n_mels)
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)               # per utterance
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0
