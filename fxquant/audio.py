"""Audio I/O (soundfile/libsndfile, soxr) and features in torch: windowed-sinc resampling, log-mel.

Example:
    >>> x16k = load_audio("speech.flac")            # doctest: +SKIP
    >>> x, sr = torch.randn(1, 8000), 8000           # e.g. load_wav("0_george_0.wav"): FSDD is 8 kHz
    >>> x16 = resample(x, sr, 16000)
    >>> LogMel()(x16).shape                          # (1, 1, 40, frames), BC-ResNet settings
    torch.Size([1, 1, 40, 32])
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import nn

from fxquant.errors import AudioError, AudioNotFoundError, ConfigError

__all__ = [
    "load_audio",
    "load_wav",
    "SUPPORTED_FORMATS",
    "resample",
    "hz_to_mel",
    "mel_to_hz",
    "mel_filterbank",
    "log_mel",
    "LogMel",
]


SUPPORTED_FORMATS = (
    "WAV (8/16/24/32-bit PCM, float), FLAC, OGG (Vorbis, Opus), MP3, AIFF and the other libsndfile formats"
)
MAX_AUDIO_SECONDS = 4 * 3600  # a longer file is refused before it is decoded into memory


def _read_mono(path, max_seconds: float = MAX_AUDIO_SECONDS) -> tuple[np.ndarray, int]:
    """Decode any libsndfile format to float32 mono samples and the file's sample rate."""
    path = Path(path)
    if not path.is_file():
        raise AudioNotFoundError(
            f"audio file not found: {path}; check the path" + (" (it is a folder)" if path.is_dir() else "")
        )
    try:
        info = sf.info(str(path))
        if info.samplerate <= 0 or info.channels <= 0:
            raise AudioError(f"{path}: header declares {info.samplerate} Hz and {info.channels} channels")
        if info.frames > max_seconds * info.samplerate:
            raise AudioError(
                f"{path}: {info.frames / info.samplerate:.0f} s of audio exceeds the limit of "
                f"{max_seconds:.0f} s; split the file first"
            )
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, AudioError):
            raise
        raise AudioError(
            f"{path}: not a readable audio file ({exc}); formats that work: {SUPPORTED_FORMATS}"
        ) from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no samples; pass a file with audio in it")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(
            f"{path}: the samples contain NaN or infinity; re-export the file as PCM WAV or FLAC"
        )
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr)


def load_wav(path) -> tuple[torch.Tensor, int]:
    """Read an audio file (any format `load_audio` reads) into a mono float tensor in [-1, 1] and its rate.

    Multi-channel files are averaged to mono; the sample rate is the file's own (no resampling).

    Example:
        >>> sf.write("clip.wav", np.zeros(8000, np.float32), 8000)
        >>> x, sr = load_wav("clip.wav")
        >>> x.dtype, x.dim(), sr
        (torch.float32, 1, 8000)
    """
    data, sr = _read_mono(path)
    return torch.from_numpy(data), sr


def load_audio(
    path, sample_rate: int = 16000, *, quality: str = "HQ", max_seconds: float = MAX_AUDIO_SECONDS
) -> torch.Tensor:
    """Read an audio file as float32 mono samples at `sample_rate` (1-D tensor).

    Decoding is libsndfile's (through soundfile): WAV of any PCM width or float, FLAC, OGG, MP3, ...
    Channels are averaged; other rates are resampled with soxr at `quality` ("HQ" or "VHQ").
    A missing path raises AudioNotFoundError; an unreadable, empty or over-long file raises AudioError.

    Example:
        >>> x = load_audio("speech_44k_stereo.flac")   # doctest: +SKIP
        >>> x.dtype, x.dim()                           # doctest: +SKIP
        (torch.float32, 1)
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ConfigError(f"sample_rate must be a positive int, got {sample_rate!r}")
    if quality not in ("QQ", "LQ", "MQ", "HQ", "VHQ"):
        raise ConfigError(f"quality must be one of QQ, LQ, MQ, HQ, VHQ (soxr presets), got {quality!r}")
    data, sr = _read_mono(path, max_seconds)
    if sr != sample_rate:
        data = soxr.resample(data, sr, sample_rate, quality=quality).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(data))


def _sinc_kernel(orig: int, new: int, width: int, rolloff: float, beta: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc kernels, shape (new, 2*pad + orig), for rates reduced by their gcd."""
    cutoff = min(orig, new) * rolloff  # in units where the reduced rates are orig and new
    pad = math.ceil(width * orig / cutoff)  # input samples needed either side
    taps = torch.arange(-pad, pad + orig, dtype=torch.float64)[None, :] / orig  # input time (in orig periods)
    phase = torch.arange(0, new, dtype=torch.float64)[:, None] / new  # output time of each phase
    t = (taps - phase) * cutoff  # distance in zero-crossings of the low-pass sinc
    inside = t.abs() <= width
    ratio = (t / width).clamp(-1.0, 1.0)
    window = torch.special.i0(beta * torch.sqrt(1.0 - ratio * ratio)) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64)
    )
    kernel = torch.special.sinc(t) * window * inside * (cutoff / orig)
    return kernel, pad


def resample(
    x: torch.Tensor, orig_sr: int, new_sr: int, *, width: int = 10, rolloff: float = 1.0, beta: float = 5.0
) -> torch.Tensor:
    """Resample along the last axis with a Kaiser-windowed sinc polyphase filter.

    `width` is the number of sinc zero-crossings kept on each side; the low-pass cut-off is
    `rolloff` times the lower Nyquist frequency. The defaults are the classic polyphase design
    (Kaiser beta 5, 10 zero-crossings, cut-off at the lower Nyquist), the one that reproduces the
    published BC-ResNet FSDD figure. Output length is ceil(len * new_sr / orig_sr).

    Example:
        >>> y = resample(torch.zeros(8000), 8000, 16000)
        >>> y.shape
        torch.Size([16000])
    """
    if int(orig_sr) <= 0 or int(new_sr) <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {new_sr}")
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr == new_sr:
        return x.clone()
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    if orig * new > 1_000_000:
        raise ValueError(
            f"rates {orig_sr} -> {new_sr} reduce to {orig}:{new}; pick rates with a larger common divisor"
        )
    kernel, pad = _sinc_kernel(orig, new, width, rolloff, beta)
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    n_in = shape[-1]
    padded = torch.nn.functional.pad(flat, (pad, pad + orig))
    out = torch.nn.functional.conv1d(padded.to(torch.float64), kernel[:, None, :], stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)  # interleave phases: (B, steps * new)
    n_out = math.ceil(n_in * new / orig)
    return out[:, :n_out].to(x.dtype).reshape(*shape[:-1], n_out)


def hz_to_mel(f):
    """HTK mel scale: 2595 * log10(1 + f / 700)."""
    return (
        2595.0 * math.log10(1.0 + f / 700.0)
        if isinstance(f, (int, float))
        else 2595.0 * torch.log10(1.0 + f / 700.0)
    )


def mel_to_hz(m):
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(
    n_fft: int = 1024,
    n_mels: int = 40,
    sample_rate: int = 16000,
    f_min: float = 0.0,
    f_max: float | None = None,
) -> torch.Tensor:
    """Triangular HTK mel filters of peak height 1 (no area normalisation), shape (n_fft//2+1, n_mels).

    Example:
        >>> mel_filterbank(1024, 40, 16000).shape
        torch.Size([513, 40])
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, f_max={f_max}, sr={sample_rate}"
        )
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(float(f_min)), hz_to_mel(float(f_max)), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)  # (n_mels + 2,) band edges in Hz
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - lower) / (centre - lower)
    falling = (upper - freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)


def log_mel(
    x: torch.Tensor,
    *,
    sample_rate: int = 16000,
    n_fft: int = 1024,
    win_length: int | None = None,
    hop_length: int = 512,
    n_mels: int = 40,
    f_min: float = 0.0,
    f_max: float | None = 8000.0,
    log: str = "log2",
    eps: float = 1e-9,
    fbank: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-mel power spectrogram of (..., samples) -> (..., n_mels, frames).

    STFT with a periodic Hann window, center=True with reflect padding, power |X|^2, HTK mel
    filters, then log2/ln/log10(mel + eps). Frames = 1 + samples // hop_length.

    Example:
        >>> log_mel(torch.zeros(16000)).shape      # BC-ResNet defaults
        torch.Size([40, 32])
    """
    if log not in ("log2", "ln", "log10"):
        raise ValueError(f"log must be 'log2', 'ln' or 'log10', got {log!r}")
    win_length = n_fft if win_length is None else win_length
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).to(torch.float32)
    if flat.shape[-1] <= n_fft // 2:
        raise ValueError(
            f"signal of {flat.shape[-1]} samples is too short for reflect padding with n_fft={n_fft}"
        )
    spec = torch.stft(
        flat,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=torch.hann_window(win_length),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    power = spec.real**2 + spec.imag**2  # (B, n_freqs, frames)
    if fbank is None:
        fbank = mel_filterbank(n_fft, n_mels, sample_rate, f_min, f_max)
    mel = torch.matmul(power.transpose(1, 2), fbank).transpose(1, 2) + eps
    out = {"log2": torch.log2, "ln": torch.log, "log10": torch.log10}[log](mel)
    return out.reshape(*shape[:-1], fbank.shape[1], out.shape[-1])


class LogMel(nn.Module):
    """Log-mel front end as a module; defaults are the BC-ResNet spec (output (B, 1, 40, frames)).

    Set `channel_dim=False` for (B, n_mels, frames), e.g. for the digit recognizer.

    Example:
        >>> LogMel()(torch.zeros(2, 16000)).shape
        torch.Size([2, 1, 40, 32])
        >>> LogMel(n_fft=512, win_length=400, hop_length=160, n_mels=64, log="ln", eps=1e-6,
        ...        channel_dim=False)(torch.zeros(1, 16000)).shape
        torch.Size([1, 64, 101])
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        win_length: int | None = None,
        hop_length: int = 512,
        n_mels: int = 40,
        f_min: float = 0.0,
        f_max: float | None = 8000.0,
        log: str = "log2",
        eps: float = 1e-9,
        channel_dim: bool = True,
    ):
        super().__init__()
        self.kwargs = dict(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            n_mels=n_mels,
            log=log,
            eps=eps,
        )
        self.channel_dim = channel_dim
        self.register_buffer(
            "fbank", mel_filterbank(n_fft, n_mels, sample_rate, f_min, f_max), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            x = x[None]
        out = log_mel(x, fbank=self.fbank, **self.kwargs)
        return out[:, None] if self.channel_dim else out
