"""Whisper's log-mel front end: filters and features against openai-whisper on real LJ Speech clips."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fxquant.audio import load_audio
from fxquant.errors import AudioError, ConfigError
from fxquant.models.whisper_frontend import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)

LJ_CLIPS = ("LJ001-0001", "LJ001-0002", "LJ001-0011")     # 9.7 s, 1.9 s and a mid-length clip


def _openai_whisper():
    return pytest.importorskip("whisper.audio", reason="openai-whisper is not installed (reference for the front end)")


@pytest.fixture(scope="module")
def lj_audio():
    from tests.conftest import shared_dir
    root = shared_dir()
    folder = None if root is None else root / "data" / "ljspeech"
    if folder is None or not all((folder / f"{c}.flac").is_file() for c in LJ_CLIPS):
        pytest.skip("LJ Speech clips (../shared/data/ljspeech) are not present")
    return [load_audio(folder / f"{c}.flac") for c in LJ_CLIPS]


def test_constants():
    assert (SAMPLE_RATE, N_FFT, HOP_LENGTH, CHUNK_LENGTH) == (16000, 400, 160, 30)
    assert (N_SAMPLES, N_FRAMES) == (480000, 3000)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_openai_whisper_asset(n_mels):
    audio_mod = _openai_whisper()
    asset = Path(audio_mod.__file__).parent / "assets" / "mel_filters.npz"
    with np.load(asset, allow_pickle=False) as f:
        expected = f[f"mel_{n_mels}"]
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - expected).max() < 1e-6


def test_mel_filters_are_slaney_triangles_and_a_fresh_copy():
    fb = mel_filters(80)
    assert fb[:, 0].sum() == 0.0                           # 0 Hz is the lower edge of the first band
    assert (fb > 0).sum(dim=1).min() >= 1                  # every band covers a bin
    area_hz = fb.sum(dim=1) * (SAMPLE_RATE / N_FFT)        # Slaney norm: every triangle has unit area in Hz
    assert torch.allclose(area_hz, torch.ones(80), atol=0.1) and abs(area_hz.mean().item() - 1.0) < 0.01
    fb[0, 0] = 123.0
    assert mel_filters(80)[0, 0] == 0.0
    with pytest.raises(ConfigError, match="n_mels must be an int"):
        mel_filters(0)


def test_pad_or_trim_any_dim():
    x = torch.arange(6.0).reshape(2, 3)
    assert pad_or_trim(x, 2).tolist() == [[0.0, 1.0], [3.0, 4.0]]
    assert pad_or_trim(x, 4, dim=0).tolist() == [[0, 1, 2], [3, 4, 5], [0, 0, 0], [0, 0, 0]]
    assert pad_or_trim(x, 5, dim=1).tolist() == [[0, 1, 2, 0, 0], [3, 4, 5, 0, 0]]
    assert pad_or_trim(torch.zeros(10)).shape == (N_SAMPLES,)
    with pytest.raises(ConfigError, match="non-negative int"):
        pad_or_trim(x, -1)


def test_silence_and_shapes():
    out = log_mel_spectrogram(torch.zeros(16000))
    assert out.shape == (80, 100)                          # frames = samples // hop
    assert torch.all(out == (-10.0 + 4.0) / 4.0)           # log10(1e-10) everywhere
    assert log_mel_spectrogram(pad_or_trim(torch.zeros(100))).shape == (80, N_FRAMES)
    assert log_mel_spectrogram(torch.zeros(3, 32000), n_mels=128).shape == (3, 128, 200)
    assert log_mel_spectrogram(torch.zeros(16000), padding=N_SAMPLES).shape == (80, 100 + N_FRAMES)


def test_sine_lights_its_mel_band_and_floor_is_8_below_peak():
    t = torch.arange(16000, dtype=torch.float64) / 16000
    out = log_mel_spectrogram(0.5 * torch.sin(2 * math.pi * 1000 * t).float())
    band = mel_filters(80)[:, 25].argmax().item()          # the band weighting 1 kHz most (bin 25 of 40 Hz)
    assert out.mean(dim=1).argmax().item() == band
    assert out.min().item() == pytest.approx(out.max().item() - 2.0)   # floor: max - 8 in log10, / 4


def test_errors():
    with pytest.raises(AudioError, match="too short"):
        log_mel_spectrogram(torch.zeros(150))
    with pytest.raises(ConfigError, match=r"\(samples,\) or \(batch, samples\)"):
        log_mel_spectrogram(torch.zeros(1, 1, 1000))
    with pytest.raises(ConfigError, match="float tensor"):
        log_mel_spectrogram(torch.zeros(1000, dtype=torch.int16))


def test_log_mel_matches_openai_whisper_on_lj_speech(lj_audio):
    audio_mod = _openai_whisper()
    worst = 0.0
    for x in lj_audio:
        window = pad_or_trim(x)
        for ours, ref in ((log_mel_spectrogram(x), audio_mod.log_mel_spectrogram(x)),
                          (log_mel_spectrogram(x, padding=N_SAMPLES),
                           audio_mod.log_mel_spectrogram(x, padding=N_SAMPLES)),
                          (log_mel_spectrogram(window), audio_mod.log_mel_spectrogram(window))):
            assert ours.shape == ref.shape
            worst = max(worst, (ours - ref).abs().max().item())
    assert worst < 1e-4


def test_batch_equals_per_utterance(lj_audio):
    batch = torch.stack([pad_or_trim(x) for x in lj_audio])
    batch[1] *= 0.01                                        # a quiet utterance keeps its own floor
    together = log_mel_spectrogram(batch)
    assert together.shape == (3, 80, N_FRAMES)
    for i in range(3):
        alone = log_mel_spectrogram(batch[i])
        assert (together[i] - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("samples", [201, 1000, 16000, 100_003])
def test_power_spectrogram_of_padded_audio_is_zero_columns(samples):
    """What split_windows relies on: frames are transformed independently and a frame of zeros has power 0
    exactly, so padding the audio further only appends zero columns; log_mel_spectrogram is the two steps."""
    from fxquant.models.whisper_frontend import log_mel_from_power, power_spectrogram

    audio = torch.randn(samples, generator=torch.Generator().manual_seed(samples)) * 0.1
    short = power_spectrogram(audio, padding=2000)
    long = power_spectrogram(audio, padding=48_000)
    assert short.shape[0] == 201 and long.shape[1] == (samples + 48_000) // 160
    assert torch.equal(long[:, :short.shape[1] - 10], short[:, :-10])
    tail = (samples + 200) // 160 + 2                # frames from here on see only zeros
    assert torch.equal(long[:, tail:], torch.zeros_like(long[:, tail:]))
    assert torch.equal(log_mel_from_power(long), log_mel_spectrogram(audio, padding=48_000))
